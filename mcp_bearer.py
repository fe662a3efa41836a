# SPDX-License-Identifier: MIT  (c) 2026 the mcp_bearer developers; see LICENSE.
"""Bearer-token authentication for MCP servers and any other ASGI app.

Wrap an ASGI app in :class:`BearerAuthMiddleware` and every request must carry
``Authorization: Bearer <token>`` that your :class:`BearerAuthProvider` accepts;
everything else is answered with a JSON error before the app runs. Inside the
app, :func:`get_access_token` says who is calling.

One file, standard library only: copy it into a project or ``pip install`` it.

Contents, top to bottom (where each guarantee of the README is enforced):

1. Helpers used everywhere: option checks (``TypeError`` for a wrong type, ``ValueError``
   for a wrong value, the option named), digests (``_digest`` for lookups, ``_keyed_digest``
   where people read), ``_refused`` (a refusal's reason, for operators), and ``_Claims``, the
   one rule by which every provider gives each request claims no other request shares.
2. Public types: :class:`AccessToken` (its ``repr`` hides the token), :class:`Operation`, the errors.
3. Providers. :class:`StaticTokenProvider` keeps only digests; API keys of our own (``mcpb_``,
   checksummed) and the keys file it follows (``_KeysFile``). ``_http_call`` is the only code
   that touches HTTP (worker thread, deadline, size bound, no redirect, no proxy for http://).
   ``_JWKSource`` is an issuer's key set over time; :class:`JWTProvider` applies RFC 8725
   around PyJWT's signature check. :class:`IntrospectionProvider` (RFC 7662),
   :class:`CachedProvider`, :class:`ProviderChain`; :class:`RedisStore` (the only code that
   talks to Redis) and :class:`RevocationCheck` for many replicas.
4. Context helpers: :func:`get_access_token`, :func:`principal_key` (who owns a session:
   issuer and subject), :func:`require_auth`, :func:`require_scopes` (``_ScopeHierarchy``).
5. The middleware. ``_Response``: every answer, built once (``_Refusals``: one status, one
   meaning). ``_SessionOwners``: sessions belong to their creator, on both transports and any
   path. ``_Throttle``: 429 after repeated refused tokens. ``_OperationGuard``: the scopes
   each MCP operation needs, read from the body the app acts on. ``_SDKCaller``: the caller
   as the MCP SDK reads it. ``BearerAuthMiddleware.__call__`` runs the request path in order:
   public answers (excluded paths, metadata, preflights, Origin), credentials (``_credentials``,
   RFC 6750 2.1), throttle, provider (fail closed: 500/503, never a pass), expiry and scopes
   (``_judge``), sessions, operations, then the app with the caller in context variables and in
   ``scope["state"]``.
6. The command line: :func:`main` (``mcp-bearer`` / ``python -m mcp_bearer``), ``keys``, ``revoke``.

References:
- RFC 6750 (Bearer Token Usage): section 2.1 header syntax, section 3 challenges.
- RFC 9110 section 11 (HTTP authentication): case-insensitive scheme, ``1*SP``.
- RFC 9728 (OAuth 2.0 Protected Resource Metadata).
- RFC 8725 (JWT best current practices), RFC 7662 (token introspection).
- MCP specification, Authorization and Streamable HTTP (2025-11-25 and 2026-07-28): session
  binding, scope challenges and hierarchies, Origin, Mcp-Method/Mcp-Name.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import base64
import collections
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
import shlex
import socket
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn, ParamSpec, TypeGuard, TypeVar
from urllib.parse import parse_qsl, quote_plus, unquote, urlencode, urlsplit

__version__ = "0.2.0"
__all__ = [
    "DEFAULT_EXCLUDED_PATHS",
    "KEY_PREFIX",
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
    "RedisStore",
    "RevocationCheck",
    "StaticTokenProvider",
    "get_access_token",
    "main",
    "new_api_key",
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
_LOG_KEYS_FILE_BROKEN = "keys file %r cannot be used (%s); keeping the last good set of keys"
_LOG_REFUSED = "token refused: %r"
# Every field a client or an IdP supplies is quoted (%r): an encoded CR or LF in a path, a
# forwarded address or a subject cannot forge a line of the trail.
_LOG_AUDIT = "%s: %r %r from %r, principal %r%s"
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


_refusal_reason: contextvars.ContextVar[str | None] = contextvars.ContextVar("mcp_bearer_refusal_reason", default=None)


def _refused(reason: str) -> AccessToken | None:
    """A provider's "no" (None) with its reason: operators read it (DEBUG, the audit trail), clients never."""
    _refusal_reason.set(reason)
    return None


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


_REVOKED = "revoked (the deny list names its jti or its subject)"
_API_KEYS = "mcp_bearer:api-key"  # the source of every API key's claims: never an IdP's issuer
_UNNAMED_SOURCE = "mcp_bearer:provider"  # claims with neither a source nor an "iss"


class _Key(NamedTuple):
    """One API key as kept: its claims and scopes, its expiry, and its public id when it is one of ours."""

    claims: _Claims
    scopes: tuple[str, ...]
    expires_at: float | None
    key_id: str | None


class StaticTokenProvider(BearerAuthProvider):
    """A fixed set of API keys: ``{token: claims}``; a ``"scopes"`` list (or a ``"scope"`` string) becomes the scopes.

    Only SHA-256 digests of the tokens are kept. A presented token is hashed and
    looked up by digest, so lookup time depends on the digest, not on how many
    leading characters of a real key the caller guessed. A key of ours (``mcpb_``) whose
    checksum does not hold can never be listed (ValueError) and so never matches. :meth:`from_file` reads a keys
    file (digests only, with expiry) or a plain tokens file, and follows its changes.
    """

    def __init__(self, tokens: Mapping[str, Mapping[str, Any]]) -> None:
        if not isinstance(tokens, Mapping):
            raise TypeError(f"tokens must be a mapping of token -> claims, not {type(tokens).__name__}")
        self._by_digest = _plain_keys(tokens)
        self._file: _KeysFile | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, watch: bool = True) -> StaticTokenProvider:
        """Keys from a file: a keys file (``{"keys": [records]}``, see ``mcp-bearer keys``) or a plain
        ``{token: claims}`` one. With ``watch``, the file is checked at most once a second, off the event
        loop, and a changed one replaces the whole set; a broken edit keeps the last good set (one ERROR).
        """
        keys_file = _KeysFile(os.fspath(path), watch=_flag("watch", watch))
        provider = _FileTokenProvider({}) if keys_file.watched else cls({})
        provider._by_digest, provider._file = keys_file.load(), keys_file
        return provider

    def __repr__(self) -> str:  # never a token, nor a digest of one
        return f"StaticTokenProvider({len(self._by_digest)} keys)"

    async def verify_token(self, token: str) -> AccessToken | None:
        entry = self._by_digest.get(_digest(token))
        if entry is None:
            key_id = _key_id(token)
            if key_id == "":
                return _refused("malformed API key (its checksum does not hold)")
            return _refused(f"unknown or revoked API key {key_id}" if key_id else "unknown API key")
        claims, scopes, expires_at, _ = entry
        return AccessToken(token, claims.copy(), list(scopes), expires_at, _API_KEYS)


class _FileTokenProvider(StaticTokenProvider):
    """A StaticTokenProvider that follows its keys file: checked at most once a second, before a lookup."""

    async def verify_token(self, token: str) -> AccessToken | None:
        assert self._file is not None
        if self._file.due():
            self._by_digest = await self._file.refreshed(self._by_digest)
        return await super().verify_token(token)


# --- API keys of our own: made, listed and revoked by `mcp-bearer keys`, stored as digests --------------
# mcpb_<12 hex: public id>_<32 base62: 190 bits of secret><6 base62: CRC-32 of the rest>. The prefix
# and the checksum let secret scanners find leaked keys, and let a mistyped one be refused unlooked-up.

KEY_PREFIX = "mcpb_"
_KEY_SHAPE = re.compile(r"mcpb_([0-9a-f]{12})_[0-9A-Za-z]{32}([0-9A-Za-z]{6})")
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_KEYS_FILE_CHECK_SECONDS = 1.0


def new_api_key() -> tuple[str, str]:
    """A new key and its public id: the key is shown once and never stored, only its SHA-256."""
    key_id = secrets.token_hex(6)
    body = f"{KEY_PREFIX}{key_id}_{''.join(secrets.choice(_BASE62) for _ in range(32))}"
    return body + _checksum(body), key_id


def _checksum(body: str) -> str:
    value = zlib.crc32(body.encode())
    return "".join(_BASE62[value // 62**n % 62] for n in reversed(range(6)))


def _key_id(token: str) -> str | None:
    """The public id of one of our keys; "" for a token shaped like ours whose checksum fails; else None."""
    if not token.startswith(KEY_PREFIX):
        return None
    shape = _KEY_SHAPE.fullmatch(token)
    if shape is None or not hmac.compare_digest(_checksum(token[:-6]), shape[2]):
        return ""
    return shape[1]


def _scopes_of(claims: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """A key's scopes: a ``"scopes"`` list, or a ``"scope"`` string as in OAuth (RFC 6749 section 3.3)."""
    scopes = claims.get("scopes")
    if scopes is None and isinstance(claims.get("scope"), str):
        return tuple(_scope_list(claims["scope"]))
    if scopes is None and "scope" not in claims:
        return ()
    if isinstance(scopes, str) or not isinstance(scopes, (list, tuple)) or not all(isinstance(x, str) for x in scopes):
        raise TypeError(f'{where}: "scopes" must be a list of strings (or "scope" a space-separated string)')
    return tuple(scopes)


def _plain_keys(tokens: Mapping[Any, Any], where: str = "") -> dict[bytes, _Key]:
    """``{token: claims}`` as digests; errors name the entry by position, never by the token itself."""
    keys: dict[bytes, _Key] = {}
    for position, (token, claims) in enumerate(tokens.items(), 1):
        if not isinstance(token, str) or not _TOKEN68.fullmatch(token.encode("utf-8", "replace")):
            raise ValueError(f"{where}token #{position} is not a non-empty RFC 6750 token (A-Z a-z 0-9 -._~+/ then =)")
        if not isinstance(claims, Mapping):
            raise TypeError(f"{where}claims of token #{position} must be a mapping, not {type(claims).__name__}")
        key_id = _key_id(token)
        if key_id == "":  # it could never be used: the middleware refuses it before any provider asks
            raise ValueError(
                f"{where}token #{position} starts with {KEY_PREFIX} but its checksum does not hold: a typo?"
            )
        scopes = _scopes_of(claims, f"{where}token #{position}")
        keys[_digest(token)] = _Key(_Claims(claims), scopes, None, key_id)
    return keys


def _recorded_keys(records: object, where: str) -> dict[bytes, _Key]:
    """The records of a keys file as digests; errors name the record by position."""
    if not isinstance(records, list):
        raise ValueError(f'{where}: "keys" must be a list of key records')
    keys: dict[bytes, _Key] = {}
    for position, record in enumerate(records, 1):
        at = f"{where}: key #{position}"
        if not isinstance(record, dict) or not isinstance(record.get("claims", {}), dict):
            raise ValueError(f"{at} must be an object with id, sha256, claims, scopes, created_at, expires_at")
        digest, expires = record.get("sha256"), record.get("expires_at")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f'{at}: "sha256" must be the 64 hex digits of the key\'s SHA-256')
        if not (expires is None or _is_number(expires)):
            raise ValueError(f'{at}: "expires_at" must be Unix seconds or null')
        claims = record.get("claims", {})
        scopes = _scopes_of({**record, "scopes": record.get("scopes", claims.get("scopes"))}, at)
        key_id = record.get("id")
        keys[bytes.fromhex(digest)] = _Key(
            _Claims(claims), scopes, expires, key_id if isinstance(key_id, str) else None
        )
    return keys


def _read_keys(path: str) -> dict[bytes, _Key]:
    """A keys file or a plain tokens file, read whole; ValueError (naming the file) for anything else."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError as exc:  # a ValueError that would not name the file
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(document, dict):
        raise ValueError(f'{path} must hold a JSON object: {{token: claims}}, or a keys file {{"keys": [...]}}')
    try:  # a wrong shape is a ValueError like any other: the watcher keeps its last good set for it
        if isinstance(document.get("keys"), list):
            keys = _recorded_keys(document["keys"], path)
        else:
            keys = _plain_keys(document, f"{path}: ")
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    if not keys:
        raise ValueError(f"{path} holds no keys: a server nobody can use")
    return keys


class _KeysFile:
    """A keys file over time: re-read, off the event loop, when it changes; a broken edit keeps the last good set."""

    def __init__(self, path: str, *, watch: bool) -> None:
        self.path = path
        self.watched = watch
        self._seen: tuple[int, int, int] | None = None
        self._next_check = math.inf
        self._check: concurrent.futures.Future[dict[bytes, _Key] | None] | None = None
        self._lock = threading.Lock()
        self._failed: tuple[int, int, int] | bool | None = False  # the broken version last logged (None: missing)

    def load(self) -> dict[bytes, _Key]:
        try:
            self._seen = self._stamp()
            keys = _read_keys(self.path)
        except OSError as exc:
            raise ValueError(f"cannot read {self.path!r}: {exc.strerror or exc}") from None
        self._next_check = time.monotonic() + _KEYS_FILE_CHECK_SECONDS if self.watched else math.inf
        return keys

    def due(self) -> bool:
        return time.monotonic() >= self._next_check

    async def refreshed(self, current: dict[bytes, _Key]) -> dict[bytes, _Key]:
        """The key set as the file now has it, checked in a worker thread (concurrent requests share one check)."""
        with self._lock:
            self._next_check = time.monotonic() + _KEYS_FILE_CHECK_SECONDS
            previous = self._check
            if previous is not None and not previous.done():
                return current  # a read still running (a stalled file system): no other request waits on it
            self._check = check = _worker_pool().submit(self._reread)
        try:
            keys = await _result(check, 5.0)
        except TimeoutError:
            return current
        return current if keys is None else keys

    def _reread(self) -> dict[bytes, _Key] | None:
        """In a worker thread: the new set if the file changed and reads well, else None (keep the current one)."""
        stamp = None  # a file that cannot even be stat'ed (removed, say) is a broken version too
        try:
            stamp = self._stamp()
            if stamp == self._seen:
                return None
            keys = _read_keys(self.path)
        except (OSError, ValueError) as exc:
            if stamp != self._failed:  # one ERROR per broken version, not one per second
                self._failed = stamp
                logger.error(_LOG_KEYS_FILE_BROKEN, self.path, getattr(exc, "strerror", None) or exc)
            return None
        self._seen, self._failed = stamp, False
        return keys

    def _stamp(self) -> tuple[int, int, int]:
        status = os.stat(self.path)
        return status.st_mtime_ns, status.st_size, status.st_ino


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
        kid = entry.get("kid") if isinstance(entry, dict) else None
        if isinstance(kid, str):  # a kid the issuer publishes is known, even with no key we can use: no refetch
            by_kid.setdefault(kid, {})
        for algorithm, key in keys.items():
            if isinstance(kid, str):
                by_kid[kid].setdefault(algorithm, key)
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
        # header segment -> (alg, kid), or why it is refused: parsed once per distinct header.
        self._headers: dict[str, tuple[str, str | None] | str] = {}

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
        if isinstance(header, str):  # not a JWS we accept: no key lookup, no fetch (an API key never waits)
            return _refused(header)
        algorithm, kid = header
        if self._jwks is None:
            key = self._static_keys.get(algorithm)
        else:
            key = self._jwks.cached_key(kid, algorithm)
            if key is _UNKNOWN_KID:
                issuer = self._unverified_issuer(token)
                if issuer is not None:  # another issuer's token never waits on our JWKS
                    return _refused(f"wrong issuer {issuer!r}")
                key = await self._jwks.fetched_key(kid, algorithm)
        if key is None:
            return _refused(f"unknown key id {kid!r} for {algorithm}" if kid is not None else "no kid, and no sole key")
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
        except self._jwt.PyJWTError as exc:
            return _refused(self._why(exc, token))
        scopes = _scopes(claims)
        expires = claims.get("exp")
        if expires is not None and not _is_number(expires):
            return _refused("malformed: exp is no number")  # PyJWT reads "exp": "123" as one; RFC 7519 does not
        if scopes is None:
            return _refused("malformed: scope is neither a string nor a list of strings")
        if "nonce" in claims:  # OIDC Core 2: a nonce is an ID token's, never an access token's
            return _refused("an ID token (it has a nonce), not an access token")
        # exp + leeway: the middleware refuses at the same instant PyJWT would.
        return AccessToken(token, claims, scopes, None if expires is None else expires + self._leeway)

    def _why(self, error: Exception, token: str) -> str:
        """What PyJWT refused, in an operator's words; the wrong issuer is named, quoted, as the token had it."""
        jwt = self._jwt
        if isinstance(error, jwt.InvalidIssuerError):
            claims = _json_segment(token.split(".")[1])
            return f"wrong issuer {claims.get('iss') if isinstance(claims, dict) else None!r}"
        reasons = (
            (jwt.ExpiredSignatureError, "expired"),
            (jwt.ImmatureSignatureError, "not yet valid (nbf or iat in the future)"),
            (jwt.InvalidAudienceError, "wrong audience"),
            (jwt.InvalidSignatureError, "bad signature"),
            (jwt.InvalidAlgorithmError, "algorithm not allowed"),
            (jwt.MissingRequiredClaimError, f"missing claim {getattr(error, 'claim', '?')!r}"),
        )
        return next(
            (reason for kind, reason in reasons if isinstance(error, kind)), f"malformed ({type(error).__name__})"
        )

    def _header(self, token: str) -> tuple[str, str | None] | str:
        """The pinned algorithm and the key id of a compact JWS (RFC 7515 section 7.1), else why it is refused.

        Three non-empty base64url segments and nothing else: a token PyJWT would also read
        with stray characters dropped is refused, so one token has one spelling (and one cache
        entry). Headers repeat across an issuer's tokens, so each distinct one is read once.
        """
        if not token.isascii() or token.encode().translate(None, _BASE64URL) != b"..":
            return "not a JWT (no compact JWS: three base64url segments)"
        if token[0] == "." or token[-1] == "." or ".." in token:
            return "not a JWT (an empty segment)"
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

    def _read_header(self, segment: str) -> tuple[str, str | None] | str:
        header = _json_segment(segment)
        if not isinstance(header, dict):
            return "malformed JWS header"
        algorithm, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
        if "crit" in header:
            return "crit header: an extension we do not understand (RFC 7515 4.1.11)"
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:  # the header never chooses
            return f"algorithm not allowed: {algorithm!r}"
        if kid is not None and not isinstance(kid, str):
            return "malformed kid"
        if self._typ is not None and (
            not isinstance(typ, str) or typ.lower().removeprefix("application/") != self._typ
        ):  # RFC 9068 section 4 / RFC 8725 section 3.11: explicit typing, compared case-insensitively
            return f"typ {typ!r}, not {self._typ!r}"
        return algorithm, kid

    def _unverified_issuer(self, token: str) -> object:
        """The token's unverified ``iss`` if it is not one we accept (read only before fetching keys), else None."""
        claims = _json_segment(token.split(".")[1])
        if not isinstance(claims, dict):
            return "(unreadable claims)"
        issuer = claims.get("iss")
        if issuer is None:
            return "(none)" if self._issuer_required else None
        return None if issuer in self._issuer else issuer


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
    """A PEM block, a DER public key or certificate, or a JWK (Set) in JSON: no HMAC secret (RFC 8725 2.1).

    PyJWT 2.13 refuses these too (CVE-2026-48526); a vendored copy may meet an older one.
    """
    data = key.encode() if isinstance(key, str) else key
    if b"-----BEGIN" in data or data.startswith((b"ssh-", b"ecdsa-")):
        return True
    if isinstance(key, bytes) and data[:1] == b"\x30":  # ASN.1 SEQUENCE, or a random secret starting with "0"
        return _is_der_key(data)
    with contextlib.suppress(ValueError, RecursionError):
        document = json.loads(data)
        return isinstance(document, dict) and ("kty" in document or "keys" in document)
    return False


def _der_elements(data: bytes) -> list[tuple[int, bytes]] | None:
    """The (tag, contents) of the DER elements that fill ``data`` exactly, or None where they do not."""
    elements, at = [], 0
    while at < len(data):
        if at + 2 > len(data):
            return None
        tag, size, at = data[at], data[at + 1], at + 2
        if size >= 0x80:
            width = size & 0x7F
            if not 0 < width <= 4 or at + width > len(data):
                return None
            size, at = int.from_bytes(data[at : at + width], "big"), at + width
        if at + size > len(data):
            return None
        elements.append((tag, data[at : at + size]))
        at += size
    return elements


def _is_der_key(data: bytes) -> bool:
    """Whether ``data`` is shaped as a DER SubjectPublicKeyInfo, certificate or PKCS#1 RSA public key, two
    levels down: a random secret that merely starts with a SEQUENCE header (1 in 65,536) is still a secret."""
    outer = _der_elements(data)
    children = _der_elements(outer[0][1]) if outer and len(outer) == 1 and outer[0][0] == 0x30 else None
    if not children or len(children) < 2:
        return False
    tag, contents = children[0]
    if tag == 0x02:  # RSAPublicKey: SEQUENCE { modulus INTEGER, publicExponent INTEGER }
        return len(children) == 2 and children[1][0] == 0x02
    inner = _der_elements(contents) if tag == 0x30 else None
    # An AlgorithmIdentifier starts with an OID; a TBSCertificate with its [0] version or its serial INTEGER.
    return inner is not None and len(inner) > 0 and inner[0][0] in (0x06, 0xA0, 0x02)


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
            return _refused("inactive (introspection)")
        if _is_refresh_token(answer):  # RFC 8725 3.12 in spirit: a refresh token is no access token
            return _refused("a refresh token (introspection), not an access token")
        if self._audience is not None:
            audience = answer.get("aud")
            if not (audience == self._audience or (isinstance(audience, list) and self._audience in audience)):
                return _refused("wrong audience (introspection)")  # RFC 7662 4: issued for another resource server
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
    - With a :class:`RedisStore`, verdicts are shared by every replica (this cache in front), and
      ``invalidate``/``clear`` reach them all within a second; every verdict, fresh or cached, is
      checked against the store's deny list. Concurrent first requests cost one call per replica.
    """

    def __init__(
        self,
        provider: BearerAuthProvider,
        *,
        ttl: float = 300.0,
        negative_ttl: float = 0.0,
        max_entries: int = 10_000,
        max_negative_entries: int | None = None,
        store: RedisStore | None = None,
    ) -> None:
        self._verify = _verifier("provider", provider)
        if store is not None and not isinstance(store, RedisStore):
            raise TypeError(f"store must be a RedisStore or None, not {type(store).__name__}")
        self._store = store
        self._applied = 0  # the store's events (other replicas' invalidations) applied here
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
        store = self._store
        if store is not None and store.version != self._applied:
            self._apply(store)
        key = _digest(token)
        entry = self._entries.get(key)
        if entry is not None:
            deadline, (claims, scopes, expires_at, source) = entry
            now = time.monotonic()
            if now < deadline:
                access = AccessToken(token, claims.copy(), list(scopes), expires_at, source)
                if store is None or now < store.quiet_until or not store.revokes(access, now):
                    return access
                return _refused(_REVOKED)
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
            if self._store is None:
                access, left = await self._verify(token), math.inf
            else:
                access, left = await self._shared_verdict(key, token)
            if generation == self._generation:
                self._keep(key, access, left)
            if self._store is not None and isinstance(access, AccessToken) and await self._store.check(access):
                access = _refused(_REVOKED)
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

    async def _shared_verdict(self, key: bytes, token: str) -> tuple[AccessToken | None, float]:
        """Another replica's verdict from the store (and the seconds it has left), else the provider's, then
        shared. Redis down: the provider's, kept here only."""
        assert self._store is not None
        kept = await self._store.verdict(key)
        if kept is not None:
            left, record = kept
            if record is None:
                return _refused("refused on another replica (a shared negative verdict)"), left
            claims, scopes, expires_at, source = (record.get(k) for k in ("claims", "scopes", "expires_at", "source"))
            if isinstance(claims, dict) and isinstance(scopes, list) and (expires_at is None or _is_number(expires_at)):
                return AccessToken(token, claims, scopes, expires_at, source if isinstance(source, str) else None), left
        access = await self._verify(token)
        ttl = self._ttl_for(access)
        if ttl > 0:
            record = (
                None
                if access is None
                else {
                    "claims": access.claims,
                    "scopes": access.scopes,
                    "expires_at": access.expires_at,
                    "source": access.source,
                }
            )
            await self._store.keep(key, record, ttl)
        return access, math.inf

    def _ttl_for(self, access: object) -> float:
        """How long a verdict may be kept: ttl, negative_ttl for "no", never past the token's own expiry."""
        if access is None:
            return self._negative_ttl
        if not isinstance(access, AccessToken):
            return 0.0
        if access.expires_at is None:
            return self._ttl
        left = access.expires_at - time.time()  # NaN counts as expired
        return min(self._ttl, left) if left > 0 else 0.0

    def _apply(self, store: RedisStore) -> None:
        """Other replicas' invalidations and clears, as the store's reader saw them."""
        events = list(store.events)  # one C-level copy: the reader thread may append meanwhile
        if not events or events[0][0] > self._applied + 1:  # missed some: forget everything, the safe side
            self._forget(None)
        for version, digest in events:
            if version > self._applied:
                self._forget(digest)
        self._applied = events[-1][0] if events else store.version
        self._generation += 1  # a verdict being fetched now may predate them: not kept

    def _keep(self, key: bytes, access: AccessToken | None, left: float) -> None:
        """Remember a verdict here, for its TTL, and at most the ``left`` seconds a shared one still has."""
        now = time.monotonic()
        if access is None:
            if self._negative_ttl > 0:
                self._refused[key] = now + min(self._negative_ttl, left)
                if len(self._refused) > self._max_refused:
                    del self._refused[next(iter(self._refused))]
            return
        if not isinstance(access, AccessToken):
            return  # not a verdict: the middleware answers it with 500
        ttl = min(self._ttl_for(access), left)
        verdict = _Verdict(_Claims(access.claims), tuple(access.scopes), access.expires_at, access.source)
        if ttl > 0:
            self._entries[key] = (now + ttl, verdict)
            if len(self._entries) > self._max_entries:
                del self._entries[next(iter(self._entries))]

    def invalidate(self, token: str) -> None:
        """Forget one token's verdict (say, it was revoked); a verdict being fetched now is not kept either.

        With a store, every replica forgets it within a second.
        """
        self._forget_everywhere(_digest(token))

    def clear(self) -> None:
        self._forget_everywhere(None)

    def _forget_everywhere(self, key: bytes | None) -> None:
        """Forget one verdict (None: all), here and, with a store, on every replica; one being fetched too."""
        self._forget(key)
        self._generation += 1
        if self._store is not None:
            self._store.invalidate(key)

    def _forget(self, key: bytes | None) -> None:
        if key is None:
            self._entries.clear()
            self._refused.clear()
        else:
            self._entries.pop(key, None)
            self._refused.pop(key, None)


def _own_access(token: str, shared: AccessToken | None) -> AccessToken | None:
    """Another request's verdict, for this request: its own AccessToken and claims."""
    if not isinstance(shared, AccessToken):
        return shared  # None, or a wrong type the middleware answers with 500
    return AccessToken(token, _copied(shared.claims), list(shared.scopes), shared.expires_at, shared.source)


# Refusals that only say "not my kind of token": in a chain, the word of the provider whose kind it is
# (a revoked API key, an expired JWT) is the one an operator needs, whichever comes last.
_FOREIGN = ("unknown API key", "not a JWT")


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
        reason = None
        for position, verify in enumerate(self._verifiers, 1):
            access = await verify(token)
            if access is not None:
                if isinstance(access, AccessToken) and access.source is None and _claimed_issuer(access) is None:
                    access.source = f"{_UNNAMED_SOURCE}#{position}"
                return access
            said = _refusal_reason.get()
            if said is not None and (reason is None or not said.startswith(_FOREIGN)):
                reason = said
        return None if reason is None else _refused(reason)


# --- many replicas, one truth: verdicts, revocations and failure counts in Redis -------------

_LOG_STORE_DOWN = "Redis store %s unreachable (%s): verdicts are asked of the provider; the deny list %s"
_LOG_STORE_UP = "Redis store %s reachable again"
_STORE_POLL_SECONDS = 0.5  # how often each replica reads the deny list, invalidations and throttled addresses
_DENY_LIST_STALE_SECONDS = 2.0  # an older copy cannot tell a revoked token from a good one
# Run in Redis with each change to the deny list (atomically, so a concurrent change is never lost):
# drop the entries whose tokens have all expired, so the list holds what still matters and no more.
_PRUNE_DENY_LIST = """
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local ok, entry = pcall(cjson.decode, entries[i + 1])
  if ok and type(entry) == 'table' and tonumber(entry['until']) and tonumber(entry['until']) <= tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
"""
_MAX_STORE_EVENTS = 1024  # invalidations remembered for caches that have not yet applied them


def _address_name(address: str) -> str:
    """A client address as Redis keys name it: the address is the client's, never a key as it is."""
    return hashlib.sha256(address.encode()).hexdigest()[:32]


def _import_redis() -> Any:
    """The redis client, imported when a RedisStore is built, never at module import."""
    try:
        return importlib.import_module("redis")
    except ImportError:
        raise ImportError("RedisStore needs the redis client: pip install redis") from None


class RedisStore:
    """State shared by every replica, in Redis: verdicts (:class:`CachedProvider`), a deny list (revoked
    ``jti`` values and subjects) and the throttle's failure counts (``BearerAuthMiddleware(store=...)``).

    The one place that talks to Redis, through the ``redis`` client. Every call runs in a worker
    thread, bounded by ``timeout``, so no event loop (asyncio or trio) ever waits on the network. A
    background thread reads what changed every half second and keeps a local copy, so checking a
    verdict against the deny list costs no round trip. Keys are SHA-256 digests: no token is ever
    written. The URL may hold a password: it is never logged nor part of ``repr``.

    When Redis cannot be reached, verdicts are asked of the provider (slower, never wrong), failure
    counts stay per replica, and the deny list fails closed (503 with Retry-After) unless
    ``use_last_deny_list`` lets the last copy decide; one WARNING per outage, recovery on its own.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "mcp_bearer:",
        timeout: float = 0.5,
        max_token_lifetime: float = 86400.0,
        use_last_deny_list: bool = False,
    ) -> None:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("url must be a redis://, rediss:// or unix:// URL")  # never the URL: it may hold a secret
        # An unencoded '/', '?' or '#' in the password ends the host part early: the rest of the password
        # would be read as host, port or path, and quoted wherever those are (messages, repr, logs).
        if "@" in parts.path + parts.query + parts.fragment:
            raise ValueError("url must percent-encode its password ('/' as %2F, '?' as %3F, '#' as %23)")
        try:
            port = parts.port
        except ValueError:  # its message quotes the text after the last ':', which may be the password
            raise ValueError("url has an invalid port") from None
        self._where = f"{parts.scheme}://{parts.hostname or ''}{f':{port}' if port else ''}{parts.path}"
        self._prefix = _checked_text("prefix", prefix, header=True)
        self._timeout = _seconds("timeout", timeout)
        self._max_lifetime = _seconds("max_token_lifetime", max_token_lifetime)
        self._use_last = _flag("use_last_deny_list", use_last_deny_list)
        redis = _import_redis()
        retry = importlib.import_module("redis.retry").Retry(importlib.import_module("redis.backoff").NoBackoff(), 0)
        self._client = redis.Redis.from_url(
            url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout, retry=retry
        )
        self._jtis: dict[str, float] = {}  # revoked jti -> until (Unix seconds)
        self._subjects: dict[tuple[str, str], float] = {}  # (issuer, subject) -> tokens issued before are revoked
        self.throttled: dict[str, float] = {}  # address digest -> throttled until (Unix seconds)
        self._deny_version: bytes | None = b"unread"
        self._since = time.time()  # invalidations read up to here
        self._read_at_since: set[tuple[bytes, float]] = set()  # those read with the score _since: applied
        self.generation: bytes = b"0"  # of shared verdicts: clear() moves every replica to a new one
        self.events: collections.deque[tuple[int, bytes | None]] = collections.deque(maxlen=_MAX_STORE_EVENTS)
        self.version = 0  # counts events: caches compare it with what they applied, per request, for free
        self._synced_at = -math.inf
        # Until when (time.monotonic()) this copy is fresh and revokes nothing: a cache hit before then
        # needs no check at all (one comparison); after it, revokes() decides.
        self.quiet_until = -math.inf
        self._down = False
        self._lock = threading.Lock()
        self._poller: threading.Thread | None = None
        self._first_poll: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stop = threading.Event()

    def __repr__(self) -> str:  # never the URL's password
        return f"RedisStore({self._where!r}, prefix={self._prefix!r})"

    def close(self) -> None:
        """Stop the background reader (for tests and shutdown); the store is not used after this."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(self._timeout * 4 + _STORE_POLL_SECONDS)

    # -- the deny list -----------------------------------------------------------------

    def revoke_jti(self, jti: str, *, until: float) -> None:
        """Refuse the token with this ``jti`` everywhere, until ``until`` (its ``exp``, Unix seconds)."""
        self._change_deny(f"jti:{_checked_text('jti', jti, header=False)}", {"until": _seconds("until", until)})

    def revoke_subject(self, issuer: str, subject: str, *, before: float | None = None) -> None:
        """Sign a user out everywhere: tokens of (issuer, subject) issued before ``before`` (default: now).

        API keys have no issuer of their own: their issuer is ``mcp_bearer:api-key``. Kept until such
        tokens would have expired anyway (``max_token_lifetime`` after ``before``).
        """
        moment = time.time() if before is None else _seconds("before", before)
        name = "sub:" + json.dumps(
            [_checked_text("issuer", issuer, header=False), _checked_text("subject", subject, header=False)]
        )
        self._change_deny(name, {"before": moment, "until": moment + self._max_lifetime})

    def _change_deny(self, name: str, entry: dict[str, float]) -> None:
        """A change to the shared deny list; raises OSError where Redis cannot take it (the operator must know)."""
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.eval(_PRUNE_DENY_LIST, 1, self._key("deny"), repr(time.time()))
            pipe.hset(self._key("deny"), name, json.dumps(entry))
            # A value never seen before, not a count: a count starts again when Redis does (no persistence,
            # a restore, a failover), and a replica holding the same number would never read the change.
            pipe.set(self._key("deny-version"), secrets.token_hex(16))
            pipe.execute()
        except self._errors() as exc:
            raise OSError(f"the revocation could not be written to {self._where}: {type(exc).__name__}") from None

    async def check(self, access: AccessToken) -> bool:
        """Whether the deny list revokes this verdict; ProviderUnavailable when no recent copy can tell."""
        if self._poller is None or not self._first_poll.done():
            self._start()
            with contextlib.suppress(TimeoutError):
                await _result(self._first_poll, self._timeout * 2)
        return self.revokes(access)

    def revokes(self, access: AccessToken, now: float | None = None) -> bool:
        """Whether this process's copy of the deny list revokes the verdict (``now``: ``time.monotonic()``)."""
        stale = (time.monotonic() if now is None else now) - self._synced_at > _DENY_LIST_STALE_SECONDS
        if stale and not (self._use_last and self._synced_at > -math.inf):  # never read: there is no last copy
            raise ProviderUnavailable("the deny list cannot be read from Redis", retry_after=_DENY_LIST_STALE_SECONDS)
        if not self._jtis and not self._subjects:
            return False
        claims = access.claims if isinstance(access.claims, Mapping) else {}
        jti, subject, issued = claims.get("jti"), claims.get("sub"), claims.get("iat")
        if isinstance(jti, str) and jti in self._jtis:
            return True
        issuer = access.source or _claimed_issuer(access) or _UNNAMED_SOURCE
        before = self._subjects.get((issuer, subject)) if isinstance(subject, str) else None
        return before is not None and not (_is_number(issued) and issued >= before)

    # -- shared verdicts (CachedProvider) ----------------------------------------------

    async def verdict(self, digest: bytes) -> tuple[float, dict[str, Any] | None] | None:
        """A verdict another replica kept: (seconds left, its record, or None for "no"); None if there is none."""
        key = self._verdict_key(digest)
        answer = await self._call(lambda: self._client.pipeline(transaction=False).get(key).pttl(key).execute())
        if not answer or answer[0] is None or answer[1] is None or answer[1] <= 0:
            return None
        try:
            record = json.loads(answer[0])
        except (ValueError, RecursionError):
            return None
        return answer[1] / 1000, record if isinstance(record, dict) else None

    async def keep(self, digest: bytes, record: dict[str, Any] | None, ttl: float) -> None:
        """Share a verdict (None: a "no") for ``ttl`` seconds; claims that are not JSON stay local."""
        try:
            value = json.dumps(record if record is not None else "no", allow_nan=False)
        except (TypeError, ValueError):
            return
        key = self._verdict_key(digest)
        await self._call(lambda: self._client.set(key, value, px=max(1, int(ttl * 1000))))

    def invalidate(self, digest: bytes | None) -> None:
        """Forget a verdict on every replica (None: all of them), within a second; written in a worker thread."""
        _worker_pool().submit(self._guarded, self._invalidate, digest)

    def _invalidate(self, digest: bytes | None) -> None:
        pipe = self._client.pipeline(transaction=False)
        if digest is None:
            pipe.set(self._key("generation"), secrets.token_hex(16))  # never seen before, as deny-version
        else:
            pipe.delete(self._verdict_key(digest))
            now = time.time()
            pipe.zadd(self._key("invalidated"), {digest.hex(): now})
            pipe.zremrangebyscore(self._key("invalidated"), 0, now - 60)
        pipe.execute()

    # -- the throttle's failure counts -------------------------------------------------

    def count_failure(self, address: str, window: float, max_failures: int) -> None:
        """Count a refused token of this address on every replica; past the budget, throttle it everywhere."""
        self._start()
        _worker_pool().submit(self._guarded, self._count_failure, address, window, max_failures)

    def _count_failure(self, address: str, window: float, max_failures: int) -> None:
        name = _address_name(address)
        key, now = self._key(f"failures:{name}"), time.time()
        pipe = self._client.pipeline(transaction=True)
        pipe.zadd(key, {secrets.token_hex(8): now})
        pipe.zremrangebyscore(key, 0, now - window)
        pipe.zrange(key, 0, 0, withscores=True)
        pipe.zcard(key)
        pipe.pexpire(key, int(window * 1000) + 1000)
        _, _, oldest, count, _ = pipe.execute()
        if count >= max_failures and oldest:
            until = oldest[0][1] + window
            self.throttled[name] = until
            self._client.zadd(self._key("throttled-until"), {name: until})

    def throttled_until(self, address: str) -> float:
        """When a throttle decided on another replica ends for this address (Unix seconds); 0 for none."""
        if not self.throttled:
            return 0.0
        return self.throttled.get(_address_name(address), 0.0)

    # -- the background reader ---------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._poller is None:
                self._poller = threading.Thread(target=self._run, name="mcp_bearer-redis", daemon=True)
                self._poller.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._guarded(self._poll)
            if not self._first_poll.done():
                self._first_poll.set_result(None)
            self._stop.wait(_STORE_POLL_SECONDS)

    def _poll(self) -> None:
        """One read of what changed: the deny list (when its version moved), invalidations, throttled addresses."""
        pipe = self._client.pipeline(transaction=False)
        pipe.mget(self._key("deny-version"), self._key("generation"))
        pipe.zrangebyscore(self._key("invalidated"), self._since, "+inf", withscores=True)
        now = time.time()
        # Scored by when each throttle ends, so that ended ones are dropped, not read at every poll for good.
        pipe.zremrangebyscore(self._key("throttled-until"), 0, now)
        pipe.zrangebyscore(self._key("throttled-until"), now, "+inf", withscores=True)
        (deny_version, generation), invalidated, _, throttled = pipe.execute()
        if deny_version != self._deny_version:
            self._install_deny(self._client.hgetall(self._key("deny")))
            self._deny_version = deny_version
        self.throttled = {name.decode(): until for name, until in throttled}
        generation = generation or b"0"
        if generation != self.generation:
            self.generation = generation
            self._event(None)
        for member, score in invalidated:
            if (member, score) not in self._read_at_since:  # the bound is inclusive: the last ones come again
                self._event(bytes.fromhex(member.decode()))
        if invalidated:
            self._since = max(score for _, score in invalidated)
            self._read_at_since = {(member, score) for member, score in invalidated if score == self._since}
        self._synced_at = time.monotonic()
        self.quiet_until = -math.inf if self._jtis or self._subjects else self._synced_at + _DENY_LIST_STALE_SECONDS
        if self._down:
            self._down = False
            logger.info(_LOG_STORE_UP, self._where)

    def _install_deny(self, entries: Mapping[bytes, bytes]) -> None:
        now = time.time()
        jtis: dict[str, float] = {}
        subjects: dict[tuple[str, str], float] = {}
        for name_bytes, value in entries.items():
            entry = json.loads(value)
            if entry["until"] <= now:
                continue  # the tokens it covers have expired anyway
            name = name_bytes.decode()
            if name.startswith("jti:"):
                jtis[name[4:]] = entry["until"]
            else:
                issuer, subject = json.loads(name[4:])
                subjects[(issuer, subject)] = entry["before"]
        if jtis or subjects:
            self.quiet_until = -math.inf  # before the entries: no cache hit may skip them, even for an instant
        self._jtis, self._subjects = jtis, subjects

    def _event(self, digest: bytes | None) -> None:
        self.events.append((self.version + 1, digest))
        self.version += 1

    # -- plumbing ----------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return self._prefix + name

    def _verdict_key(self, digest: bytes) -> str:
        return self._key(f"verdict:{self.generation.decode()}:{digest.hex()}")

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (importlib.import_module("redis.exceptions").RedisError, OSError, ValueError, KeyError, TypeError)

    def _guarded(self, call: Callable[..., None], *args: Any) -> None:
        """In a worker thread: a call whose failure is an outage (logged once), never an exception."""
        try:
            call(*args)
        except self._errors() as exc:
            if not self._down:
                self._down = True
                fallback = "uses its last copy" if self._use_last else "refuses with 503 until it is read again"
                logger.warning(_LOG_STORE_DOWN, self._where, type(exc).__name__, fallback)

    async def _call(self, call: Callable[[], Any]) -> Any:
        """One bounded call in a worker thread; None where Redis does not answer in time."""
        future = _worker_pool().submit(self._answer, call)
        try:
            return await _result(future, self._timeout * 2)
        except TimeoutError:
            return None

    def _answer(self, call: Callable[[], Any]) -> Any:
        result: list[Any] = []
        self._guarded(lambda: result.append(call()))
        return result[0] if result else None


class RevocationCheck(BearerAuthProvider):
    """A provider's verdicts, checked against a :class:`RedisStore`'s deny list (for a provider with no cache)."""

    def __init__(self, provider: BearerAuthProvider, store: RedisStore) -> None:
        self._verify = _verifier("provider", provider)
        if not isinstance(store, RedisStore):
            raise TypeError(f"store must be a RedisStore, not {type(store).__name__}")
        self._store = store

    async def verify_token(self, token: str) -> AccessToken | None:
        access = await self._verify(token)
        if isinstance(access, AccessToken) and await self._store.check(access):
            return _refused(_REVOKED)
        return access


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
        if not isinstance(granted, (list, tuple, set, frozenset)):
            return frozenset()  # a str too: "read write" is no list of scopes
        if not self._closure:
            try:
                return frozenset(granted)  # anything that is no str never equals a needed scope
            except TypeError:  # a list or dict in the list cannot even be hashed: it is no scope either
                return frozenset(s for s in granted if isinstance(s, str))
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
        self.no_oauth = self._refusal(
            404, "not_found", "No OAuth here: send an API key as Authorization: Bearer <key>", challenge=False
        )
        self.too_many = self._refusal(
            429, "too_many_requests", "Too many refused tokens from this address; retry later", challenge=False
        )
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
        return _retry_later(self.unavailable, seconds)


def _retry_later(refusal: _Response, seconds: int) -> _Response:
    """A refusal with RFC 9110 section 10.2.3 Retry-After (503, 429)."""
    status, headers, body, error = refusal
    return _Response(status, (*headers, (b"retry-after", b"%d" % seconds)), body, error)


_MAX_TRACKED = 10_000  # client addresses (and accepted tokens) the throttle remembers, oldest forgotten first


class _Throttle:
    """Token guessing, slowed down: a client address whose tokens were refused ``max_failures`` times within
    ``failure_window`` seconds gets 429 for further token-bearing requests until the window has passed,
    and the provider is not asked (a spray costs a token service at most that many calls per window, plus
    the requests already on their way to it when the last of them is counted).

    A token accepted within the window is never throttled, so a valid user behind the same NAT keeps
    working. The address is ``scope["client"]``, so behind a proxy the server must set it from the
    forwarded header (uvicorn: ``--proxy-headers --forwarded-allow-ips``). Bounded: oldest forgotten.
    """

    def __init__(self, max_failures: int, window: float, refusals: _Refusals, store: RedisStore | None) -> None:
        self._max_failures = max_failures
        self._window = window
        self._store = store
        if store is not None:
            store._start()  # its reader learns of addresses other replicas throttled, before any failure here
        self._too_many = refusals.too_many
        self._failures: dict[str, collections.deque[float]] = {}  # address -> times of its latest refusals
        self._accepted: dict[bytes, float] = {}  # token digest -> when last accepted

    def refusal(self, scope: Scope, token: str) -> _Response | None:
        address = _address(scope)
        times = self._failures.get(address)
        now = time.monotonic()
        wait = times[0] + self._window - now if times is not None and len(times) == self._max_failures else 0.0
        if self._store is not None:  # the budget of every replica together, as the store's reader last saw it
            wait = max(wait, self._store.throttled_until(address) - time.time())
        if wait <= 0:
            return None
        accepted = self._accepted.get(_digest(token))
        if accepted is not None and now - accepted < self._window:
            return None  # accepted lately: a valid user behind the same address as a sprayer
        return _retry_later(self._too_many, math.ceil(wait))

    def failed(self, scope: Scope) -> None:
        address = _address(scope)
        if self._store is not None:
            self._store.count_failure(address, self._window, self._max_failures)
        times = self._failures.pop(address, None) or collections.deque(maxlen=self._max_failures)
        times.append(time.monotonic())
        self._failures[address] = times  # re-inserted: the least recently refused address goes first
        if len(self._failures) > _MAX_TRACKED:
            del self._failures[next(iter(self._failures))]

    def accepted(self, token: str) -> None:
        digest = _digest(token)
        self._accepted.pop(digest, None)
        self._accepted[digest] = time.monotonic()
        if len(self._accepted) > _MAX_TRACKED:
            del self._accepted[next(iter(self._accepted))]


def _address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "(unknown)"


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
        if not keys:
            return False  # no session named: the SDK itself answers 400
        on_messages_path = _under(_relative_path(scope), self._message_paths)
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


# Where OAuth clients look for an authorization server (RFC 8414, OIDC Discovery, RFC 9728, and the
# 2025-03-26 MCP fallback's /register). Without resource= there is none: a 404, not a 401 that
# clients report as "registration rejected" for what is a mistyped key.
_OAUTH_DISCOVERY = (
    "/.well-known/oauth-authorization-server",
    "/.well-known/openid-configuration",
    PROTECTED_RESOURCE_METADATA_PATH,
)


def _is_oauth_discovery(path: str) -> bool:
    return (
        path == "/register" or path.startswith(_OAUTH_DISCOVERY) or path.endswith("/.well-known/openid-configuration")
    )


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
_ROUTING_HEADERS = frozenset({b"mcp-method", b"mcp-name"})
_ROUTING_NAME_SIZES = frozenset(len(name) for name in _ROUTING_HEADERS)
_NO_ROUTING: list[tuple[bytes, bytes]] = []  # never appended to: a request with routing headers gets its own
_LOG_OPERATION_SCOPES_FAILED = "operation_scopes failed; request refused with 500\n%s"
# json.loads without its Python wrapper: the same C scanner, set on the decoder as an instance attribute.
_JSON_SCAN: Callable[[str, int], tuple[Any, int]] = vars(json.JSONDecoder())["scan_once"]
_JSON_WHITESPACE = " \t\n\r"


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
    batch counts, and it is parsed as ``json.loads`` parses bytes, which accepts all that the
    SDK's parsers accept and reads it as they do (a duplicated key: the last one). A 2026-07-28
    client also names the operation in ``Mcp-Method`` and ``Mcp-Name``; those must agree with the
    body. What cannot be read with certainty is refused (400), a body over ``max_body_size`` too
    (413), and the app then gets the body as it came, message by message. Requests other than
    POST carry no operation and need ``required_scopes`` only.
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
        elif inspect.iscoroutinefunction(rules) or inspect.iscoroutinefunction(vars(type(rules)).get("__call__")):
            raise TypeError("operation_scopes must be a plain function of the operation, not an async one")
        elif callable(rules):
            self._decide = rules
        else:
            raise TypeError(
                "operation_scopes must be a mapping of operation pattern -> scopes, or a callable "
                f"(operation) -> scopes, not {type(rules).__name__}"
            )
        self._needs: dict[tuple[str, str | None], tuple[str, ...]] = {}  # (method, name) -> all it needs

    async def admit(
        self, scope: Scope, receive: Receive, access: AccessToken, routing: list[tuple[bytes, bytes]]
    ) -> tuple[_Response | None, Receive]:
        """A refusal, or the ``receive`` that hands the app the body this read."""
        if scope["type"] != "http" or scope.get("method") != "POST":
            return self._verdict(self._required, access), receive
        messages = [await receive()]
        if messages[0]["type"] != "http.request" or messages[0].get("more_body", False):
            read = await self._rest_of_body(receive, messages)
            if read is not None:
                return read, receive
        body = messages[0].get("body", b"") if len(messages) == 1 else b"".join(m.get("body", b"") for m in messages)
        if len(body) > self._max_body_size:
            return self._refusals.too_large, receive
        try:
            needed = self._needed(body, routing)
        except _Unreadable:
            return self._refusals.unreadable, receive
        except Exception as exc:  # a rule of the user's that fails is no reason to let the request through
            logger.error(_LOG_OPERATION_SCOPES_FAILED, "".join(traceback.format_exception(exc)))
            return self._refusals.server_error, receive
        return self._verdict(needed, access), _replaying(messages, receive)

    def _verdict(self, needed: tuple[str, ...], access: AccessToken) -> _Response | None:
        if not needed or self._hierarchy.effective(access.scopes).issuperset(needed):
            return None
        return self._refusals.insufficient_for(needed)

    async def _rest_of_body(self, receive: Receive, messages: list[Message]) -> _Response | None:
        """A body in several messages, each added to ``messages``; a refusal where it cannot be read whole."""
        size = 0
        while True:
            message = messages[-1]
            if message["type"] != "http.request":
                return self._refusals.unreadable  # http.disconnect: nobody is left to serve
            size += len(message.get("body", b""))
            if size > self._max_body_size:
                return self._refusals.too_large  # counted as it comes: never more than the bound is held
            if not message.get("more_body", False):
                return None
            messages.append(await receive())

    def _needed(self, body: bytes, routing: list[tuple[bytes, bytes]]) -> tuple[str, ...]:
        """``required_scopes`` and every scope any operation of the body needs, in a stable order."""
        operations = _operations(body, routing)
        if self._decide is None and len(operations) == 1:
            return self._by_rule(*operations[0][:2])
        needed = dict.fromkeys(self._required)
        for method, name, params in operations:
            if self._decide is not None:
                for reading in _readings(method, name):
                    decided = self._decide(Operation(method, reading, params))
                    needed.update(dict.fromkeys(_scope_tokens("operation_scopes()", decided)))
            else:
                needed.update(dict.fromkeys(self._by_rule(method, name)))
        return tuple(needed)

    def _by_rule(self, method: str, name: str | None) -> tuple[str, ...]:
        """``required_scopes`` and those of every pattern that matches, remembered per (method, name)."""
        needs = self._needs.get((method, name))
        if needs is None:
            scopes = dict.fromkeys(self._required)
            readings = _readings(method, name)
            for regex, rule_scopes in self._rules.get(method, ()):
                if regex is None or any(reading is not None and regex.match(reading) for reading in readings):
                    scopes.update(dict.fromkeys(rule_scopes))
            needs = tuple(scopes)
            if len(self._needs) >= _MAX_NEEDS_KEPT:  # names are the client's: bounded, oldest forgotten
                del self._needs[next(iter(self._needs))]
            self._needs[(method, name)] = needs
        return needs


def _readings(method: str, name: str | None) -> tuple[str | None, ...]:
    """Every name the app may act on for this one; a rule that matches any of them applies.

    A resource URI is also read percent-decoded (RFC 3986 section 6.2.2.2; the SDK's URI templates
    decode what they extract: ``file:///%61dmin/x`` fills ``{area}`` with ``admin``), and as the
    SDK's own request model reads it where that is loaded (mcp 1.x makes it a pydantic ``AnyUrl``,
    so ``FILE:///a/../admin/x`` is served as ``file:///admin/x``).
    """
    if name is None or method not in _NAMED_BY or _NAMED_BY[method] != "uri":
        return (name,)
    readings = dict.fromkeys((name, unquote(name)))
    model = getattr(sys.modules.get("mcp.types"), "ReadResourceRequestParams", None)
    if model is not None:
        with contextlib.suppress(Exception):  # a URI the SDK cannot read, it never serves
            readings[str(model.model_validate({"uri": name}).uri)] = None
    return tuple(readings)


def _read_json(body: bytes) -> Any:
    """The body as ``json.loads(body)`` reads it (encoding detected, a BOM allowed), without its wrapper's cost."""
    # json.detect_encoding's answer for a body that opens an object or array in ASCII, without its cost.
    plain = body.startswith((b"{", b"[")) and body[1:2] != b"\x00"
    try:
        text = body.decode("utf-8" if plain else json.detect_encoding(body), "surrogatepass")
        start = 0 if plain else len(text) - len(text.lstrip(_JSON_WHITESPACE))
        value, end = _JSON_SCAN(text, start)
    except (ValueError, RecursionError, StopIteration):  # StopIteration: no JSON value at all
        raise _Unreadable from None
    if text[end:].strip(_JSON_WHITESPACE):
        raise _Unreadable  # "Extra data", as json.loads says
    return value


def _operations(body: bytes, routing: list[tuple[bytes, bytes]]) -> list[tuple[str, str | None, Any]]:
    """Every (method, name, params) a JSON-RPC body asks for; _Unreadable for anything we cannot read with certainty.

    A response (it answers the server, and asks nothing) has none. Where a 2026-07-28 client names
    the operation in ``Mcp-Method`` (and ``Mcp-Name``), the body must be that one request.
    """
    document = _read_json(body)
    elements = document if isinstance(document, list) else [document]
    operations = []
    for element in elements:
        if not isinstance(element, dict):
            raise _Unreadable
        method = element.get("method")
        if method is None and ("result" in element or "error" in element):
            continue
        params = element.get("params", {})  # omitted: JSON-RPC 2.0 section 4.2; null is no structured value
        if not isinstance(method, str) or not isinstance(params, dict):
            raise _Unreadable
        name = params.get(_NAMED_BY[method]) if method in _NAMED_BY else None
        if method in _NAMED_BY and not isinstance(name, str):  # the SDK refuses it too; we never judge by a guess
            raise _Unreadable
        operations.append((method, name, params))
    if not elements:
        raise _Unreadable
    method_header, name_header = _routing_headers(routing) if routing else (None, None)
    if method_header is not None:  # MCP 2026-07-28: one request, named in the headers as in the body
        if len(elements) != 1 or len(operations) != 1 or operations[0][0] != method_header:
            raise _Unreadable
        if name_header is not None and operations[0][0] in _NAMED_BY and operations[0][1] != name_header:
            raise _Unreadable
    return operations


def _routing_headers(routing: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """``Mcp-Method`` and ``Mcp-Name`` (decoded as the SDK decodes it); _Unreadable for one sent twice.

    First-copy and last-copy readers would disagree about a repeated one.
    """
    found = dict(routing)
    if len(found) != len(routing):
        raise _Unreadable
    method, label = found.get(b"mcp-method"), found.get(b"mcp-name")
    name = None if label is None else _header_name(label.decode("latin-1"))
    return None if method is None else method.decode("latin-1"), name


def _header_name(value: str) -> str:
    """``Mcp-Name`` as the SDK decodes it: verbatim, or the ``=?base64?...?=`` sentinel's canonical UTF-8."""
    match = _BASE64_SENTINEL.fullmatch(value)
    if match is None:
        return value
    try:
        decoded = base64.b64decode(match[1], validate=True)
        if base64.b64encode(decoded).decode("ascii") != match[1]:
            raise _Unreadable  # non-canonical: the SDK's decoder refuses it too
        return decoded.decode("utf-8")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise _Unreadable from None


def _replaying(pending: list[Message], receive: Receive) -> Receive:
    """The app's ``receive``: the body messages already read (this list, taken over), then the server's own."""

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
        context_var = importlib.import_module("mcp.server.auth.middleware.auth_context").auth_context_var
        caller = _sdk_user_type(bearer_auth.AuthenticatedUser, importlib.import_module("mcp.server.auth.provider"))
        self._new_user: Callable[[], Any] = functools.partial(object.__new__, caller)  # the SDK's __init__ unrun
        self._set = context_var.set

    def enter(self, scope: Scope, access: AccessToken) -> contextvars.Token[Any]:
        """Hand the SDK this request's caller, as its AuthenticatedUser; nothing of the SDK's is built
        until something reads it. Returns the token that resets its context variable."""
        scope["user"] = user = self._new_user()
        user._access = access
        reset: contextvars.Token[Any] = self._set(user)
        return reset

    @staticmethod
    def wanted() -> bool:
        """Whether the app is likely an MCP SDK app: its server code is loaded (never imported here)."""
        return "mcp.server.auth.middleware.bearer_auth" in sys.modules


def _sdk_user_type(base: Any, provider: Any) -> type[Any]:
    class Caller(base):  # type: ignore[misc]
        """The SDK's AuthenticatedUser for one request (made by ``_SDKCaller.enter``); its AccessToken on first read."""

        _access: AccessToken
        _built: Any = None

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


_DEFAULT_PORTS = {"http": 80, "https": 443}
_ORIGIN_NETLOC = re.compile(r"(?:[a-z0-9-]+(?:\.[a-z0-9-]+)*\.?|\[[0-9a-f:.]+\])(?::[0-9]+)?")


def _origins(allowed: object) -> frozenset[str] | None:
    """``allowed_origins``: serialized origins (RFC 6454 section 6.2, "scheme://host[:port]"), lower case.

    An entry no browser sends (a wildcard, a default port, which browsers leave out) would match
    nothing, silently: it is refused.
    """
    if allowed is None:
        return None
    origins = set()
    for origin in _strings("allowed_origins", allowed):
        if not _is_origin(origin.lower()):
            raise ValueError(f"allowed_origins entries must be origins like 'https://app.example.com', not {origin!r}")
        origins.add(origin.lower())
    return frozenset(origins)


def _is_origin(origin: str) -> bool:
    parts = urlsplit(origin)
    if parts.scheme not in _DEFAULT_PORTS or not _ORIGIN_NETLOC.fullmatch(parts.netloc):
        return False
    try:
        port = parts.port
    except ValueError:  # above 65535
        return False
    exact = not (parts.path or parts.query or parts.fragment or origin.endswith(("?", "#")))
    return exact and port != 0 and port != _DEFAULT_PORTS[parts.scheme]


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


def _undo_all(undo: list[Callable[[], None]]) -> None:
    for step in reversed(undo):
        step()


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
        max_failures: int | None = None,
        failure_window: float = 60.0,
        store: RedisStore | None = None,
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
        self._hierarchy = _NO_HIERARCHY if scope_implies is None else _ScopeHierarchy(scope_implies)
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
        self._no_oauth = None if resource is not None else self._refusals.no_oauth
        self._invalid_token = self._refusals.invalid_token
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
        window = _seconds("failure_window", failure_window)
        if store is not None and not isinstance(store, RedisStore):
            raise TypeError(f"store must be a RedisStore or None, not {type(store).__name__}")
        self._throttle = None
        if max_failures is not None:
            failures = _positive_int("max_failures", max_failures)
            self._throttle = _Throttle(failures, window, self._refusals, store)
        # What else handing the app its caller takes, if anything.
        others = self._audit or scope_implies is not None or self._throttle is not None
        self._entering: Callable[[Scope, AccessToken, Callable[[], None] | None], Callable[[], None] | None] | None
        self._entering = self._enter if others else None
        self._watched_name_sizes = _WATCHED_NAME_SIZES | (_ROUTING_NAME_SIZES if self._operations else frozenset())

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

        token, session_id, routing = self._credentials(scope)
        if not isinstance(token, str):  # none, malformed, or its client throttled: the provider is not asked
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
        if self._sessions is not None and kind == "http":  # a websocket carries no MCP session
            refusal, send, ended = self._sessions.admit(scope, send, access, session_id)
        if self._operations is not None and refusal is None:
            refusal, receive = await self._operations.admit(scope, receive, access, routing)
        if refusal is not None:
            return await self._refuse(scope, send, refusal, access)

        scope.setdefault("state", {})["access_token"] = access  # where Starlette's request.state finds it
        after = self._entering(scope, access, ended) if self._entering else ended
        sdk = self._sdk.enter(scope, access) if self._sdk is not None else None  # an MCP app's usual case
        reset = _current_token.set(access)
        try:
            await self.app(scope, receive, send)
        finally:
            _current_token.reset(reset)
            if sdk is not None:
                sdk.var.reset(sdk)
            if after is not None:
                after()

    def _enter(self, scope: Scope, access: AccessToken, ended: Callable[[], None] | None) -> Callable[[], None] | None:
        """The optional parts of handing the app its caller; returns what to undo once the app is done.

        The audit record; the throttle's note of an accepted token; the scope hierarchy, for
        ``require_scopes`` in tools. (The caller as the MCP SDK reads it is handed over in ``__call__``.)
        """
        if self._audit:
            self._audit_decision(scope, None, access, None)
        if self._throttle is not None:
            self._throttle.accepted(access.token)
        undo = [] if ended is None else [ended]
        if self._hierarchy is not _NO_HIERARCHY:
            scope["state"][_HIERARCHY_KEY] = self._hierarchy
            undo.append(functools.partial(_current_hierarchy.reset, _current_hierarchy.set(self._hierarchy)))
        if len(undo) < 2:  # nothing, or one thing, to undo: no list to walk
            return undo[0] if undo else None
        return functools.partial(_undo_all, undo)

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

    def _credentials(self, scope: Scope) -> tuple[str | _Response, bytes | None, list[tuple[bytes, bytes]]]:
        """The bearer token, the ``Mcp-Session-Id`` and the MCP routing headers of a request; a refusal
        instead of the token where there is none, it is malformed, or its client is throttled.

        One pass over the raw header pairs, as uvicorn's ProxyHeadersMiddleware reads them;
        servers send lowercase names, hand-built scopes may not (RFC 9110 section 5.1). A
        repeated header is never guessed at: two Authorization headers are malformed, two
        session ids name no session (b""). ``Mcp-Method`` and ``Mcp-Name`` are collected only
        for per-operation rules.
        """
        authorization = session_id = None
        authorizations = 0
        routing: list[tuple[bytes, bytes]] = _NO_ROUTING
        watched = self._watched_name_sizes
        for name, value in scope["headers"]:
            if len(name) in watched:
                name = name.lower()
                if name == b"authorization":
                    authorization = value
                    authorizations += 1
                elif name == b"mcp-session-id":
                    session_id = b"" if session_id is not None else value
                elif name in _ROUTING_HEADERS:
                    routing = [*routing, (name, value)]
        if authorization is None:
            return self._refusals.unauthorized, session_id, routing
        if authorizations > 1:  # which one would the app trust? Refuse rather than guess.
            return self._refusals.malformed, session_id, routing
        credentials = _BEARER_CREDENTIALS.fullmatch(authorization)
        if credentials is None:
            return self._refusal_for(authorization), session_id, routing
        token: bytes = credentials[1]
        if len(token) > self._max_token_length:
            _refused(f"longer than max_token_length ({self._max_token_length})")
            return self._invalid_token, session_id, routing
        if token.startswith(b"mcpb_") and _key_id(token.decode("ascii")) == "":  # refused before any provider asks
            _refused("malformed API key (its checksum does not hold)")
            return self._invalid_token, session_id, routing
        text = token.decode("ascii")
        if self._throttle is not None and (throttled := self._throttle.refusal(scope, text)) is not None:
            return throttled, session_id, routing
        return text, session_id, routing

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
        reason = None
        if refusal is self._invalid_token:  # a token refused: why, for operators only (DEBUG, the audit trail)
            reason = (
                "expired" if isinstance(access, AccessToken) else _refusal_reason.get() or "refused by the provider"
            )
            _refusal_reason.set(None)
            logger.debug(_LOG_REFUSED, reason)
            if self._throttle is not None:
                self._throttle.failed(scope)
        # After the count: a token guessed at /register is still a refused token. Two substring tests
        # first, so that the 401s of every other path pay next to nothing for it.
        path = scope["path"]
        discovery = "/.well-known/" in path or "/register" in path
        if (
            discovery
            and refusal.status == 401
            and self._no_oauth is not None
            and _is_oauth_discovery(_relative_path(scope))
        ):
            refusal = self._no_oauth  # an OAuth client probing a server without resource=: no OAuth here
        if self._audit:
            self._audit_decision(scope, refusal, access, reason)
        await self._respond(scope, send, refusal)

    def _audit_decision(self, scope: Scope, refusal: _Response | None, access: object, reason: str | None) -> None:
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
            "reason": reason,
        }
        values = (fields["outcome"], fields["method"], fields["path"], fields["client"], fields["principal"])
        because = "" if reason is None else f", reason {reason!r}"
        _audit_logger.info(_LOG_AUDIT, *values, because, extra={"mcp_bearer": fields})

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
_REDIS_VARIABLE = "MCP_BEARER_REDIS_URL"  # a Redis URL may hold a password: the environment, beside --redis-url
# Errors from the classes name their parameters; on the command line, the flag the user typed.
_FLAGS = {
    "jwks_url": "--jwks-url",
    "issuer": "--issuer",
    "audience": "--audience",
    "algorithms": "--algorithm",
    "leeway": "--leeway",
    "jwks_cache_seconds": "--jwks-cache-seconds",
    "jwks_refresh_cooldown": "--jwks-refresh-cooldown",
    "key": "--jwt-key-file",
    "url": "--introspection-url",
    "client_id": "--client-id",
    "ttl": "--cache-ttl",
    "exclude_paths": "--exclude",
    "required_scopes": "--required-scope",
    "resource": "--resource",
    "authorization_servers": "--authorization-server",
    "allowed_origins": "--allowed-origin",
    "max_failures": "--max-failures",
    "until": "--until",
    "before": "--before",
}
# A parameter is named first in a message, or as "name=": never inside a value the message quotes.
_FLAG_NAMES = re.compile(r"^(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")\b|\b(\w+)(?==)")
_DURATION = re.compile(r"([1-9][0-9]*)([smhd]?)")
_DURATION_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: str) -> NoReturn:
    """Bad input on the command line: one line on stderr, exit code 2."""
    print(f"mcp_bearer: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _flagged(exc: Exception) -> NoReturn:
    """A configuration error, told in the command line's words: its flags, not the parameters behind them."""
    _fail(_FLAG_NAMES.sub(_flag_for, str(exc)))


def _flag_for(match: re.Match[str]) -> str:
    name = match[1] or match[2]
    return _FLAGS.get(name, name)


def _prog() -> str:
    """The command the user typed, for usage lines."""
    return (
        "mcp-bearer" if os.path.splitext(os.path.basename(sys.argv[0]))[0] == "mcp-bearer" else "python -m mcp_bearer"
    )


def _load_app(args: argparse.Namespace) -> Any:
    target: str = args.app
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        _fail(f"app {target!r} must look like MODULE:ATTR, e.g. server:app")
    if module_name.endswith(".py") or "/" in module_name:
        where = os.path.abspath(module_name.removesuffix(".py"))
        relative, directory = os.path.relpath(where), ""
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):  # modules are imported from here
            relative, directory = os.path.basename(where), f", from {os.path.dirname(where)}"
        dotted = relative.replace(os.sep, ".")
        _fail(f"app {target!r} names a file; give the module, as Python imports it: {dotted}:{attr}{directory}")
    sys.path.insert(0, os.getcwd())  # as uvicorn does: serve a module from the current directory
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        _fail(f"cannot import module {module_name!r}: {exc}")
    for part in attr.split("."):
        if not hasattr(obj, part):
            _fail(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, BearerAuthMiddleware) or type(obj).__name__ == "BearerAuthMiddleware":
        _fail(
            f"{target} is already behind BearerAuthMiddleware, and a second one would refuse every key: "
            f"pass the app or MCP server it wraps instead, or serve {target} with uvicorn"
        )
    if hasattr(obj, "streamable_http_app"):  # an MCPServer (mcp 2.x) or FastMCP (mcp 1.x)
        return _sdk_app(obj, args)
    if not callable(obj):
        _fail(f"{target!r} is neither an ASGI app nor an MCP server, but a {type(obj).__name__}")
    return obj


def _sdk_app(server: Any, args: argparse.Namespace) -> Any:
    """An MCP server's streamable HTTP app, its DNS-rebinding guard built for the host it is served on.

    The SDK guards only localhost by default: served on another interface, requests name other
    hosts (remote clients, proxies), which ``--allowed-host`` lists for the guard to check.
    """
    security = None
    if args.allowed_host:
        settings = importlib.import_module("mcp.server.transport_security").TransportSecuritySettings
        allowed = [*args.allowed_host, *(f"{h}:*" for h in args.allowed_host if ":" not in h)]
        security = settings(enable_dns_rebinding_protection=True, allowed_hosts=allowed, allowed_origins=[])
    if "host" in inspect.signature(server.streamable_http_app).parameters:  # mcp 2.x
        return server.streamable_http_app(host=args.host, transport_security=security)
    if security is not None or not _is_loopback(args.host):  # mcp 1.x decides it when the server is made
        server.settings.host, server.settings.transport_security = args.host, security
    return server.streamable_http_app()


def _demo_app(args: argparse.Namespace) -> Any:
    """A one-tool MCP server: ``whoami`` returns the caller's claims."""

    def whoami() -> dict[str, Any]:
        """Who is calling: the claims of the bearer token."""
        return dict(require_auth().claims)

    try:
        server: Any = importlib.import_module("mcp.server.mcpserver").MCPServer("mcp_bearer demo")
    except ImportError:  # mcp 1.x
        server = importlib.import_module("mcp.server.fastmcp").FastMCP("mcp_bearer demo", host=args.host)
    server.tool()(whoami)
    return _sdk_app(server, args)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket for uvicorn, made with protocol IPPROTO_TCP rather than 0.

    asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections accepted
    from an IPPROTO_TCP socket; otherwise every response waits about 40 ms.
    """
    listener = socket.create_server((host, port))
    return socket.socket(listener.family, listener.type, socket.IPPROTO_TCP, fileno=listener.detach())


def _tokens_provider(path: str) -> StaticTokenProvider:
    """--tokens-file, with the warnings an operator needs once: plain keys on disk, a file others can read."""
    try:
        provider = StaticTokenProvider.from_file(path)
    except (TypeError, ValueError) as exc:
        _fail(f"--tokens-file: {exc}")
    with open(path, encoding="utf-8") as file:
        plain = not isinstance(json.load(file).get("keys"), list)
    if plain:
        logger.warning(
            "tokens file %r holds keys in plain text: anyone who can read it can use them "
            "(mcp-bearer keys new keeps only their digests)",
            path,
        )
    if os.stat(path).st_mode & 0o077:
        logger.warning("tokens file %r can be read by group or others: chmod 600 %s", path, shlex.quote(path))
    return provider


def _jwt_provider(args: argparse.Namespace) -> BearerAuthProvider:
    if not args.issuer or not args.audience:
        _fail("--jwks-url and --jwt-key-file need --issuer and --audience (the tokens' iss and aud)")
    if args.jwks_url is not None and args.jwt_key_file is not None:
        _fail("give one of --jwks-url (the issuer's keys) and --jwt-key-file (a PEM public key or an HMAC secret)")
    key = None
    if args.jwt_key_file is not None:
        try:
            with open(args.jwt_key_file, "rb") as file:
                key = file.read().strip()
        except OSError as exc:
            _fail(f"cannot read --jwt-key-file {args.jwt_key_file!r}: {exc.strerror or exc}")
    options = {
        "leeway": args.leeway,
        "jwks_cache_seconds": args.jwks_cache_seconds,
        "jwks_refresh_cooldown": args.jwks_refresh_cooldown,
    }
    try:
        return JWTProvider(
            issuer=args.issuer,
            audience=args.audience,
            jwks_url=args.jwks_url,
            key=key,
            algorithms=args.algorithm or ("RS256",),
            **{name: value for name, value in options.items() if value is not None},
        )
    except (TypeError, ValueError) as exc:
        _flagged(exc)


def _introspection_provider(args: argparse.Namespace) -> BearerAuthProvider:
    secret = os.environ.get(_SECRET_VARIABLE, "")
    if not args.client_id or not secret:
        _fail(f"--introspection-url needs --client-id and the client secret in ${_SECRET_VARIABLE}")
    if len(args.audience) > 1:
        _fail("--introspection-url takes at most one --audience (the introspected token's aud must contain it)")
    audience = args.audience[0] if args.audience else None
    try:
        return IntrospectionProvider(
            args.introspection_url, client_id=args.client_id, client_secret=secret, audience=audience
        )
    except (TypeError, ValueError) as exc:
        _flagged(exc)


def _cli_provider(args: argparse.Namespace) -> BearerAuthProvider | None:
    """The token sources the options name, chained API keys first; None when they name none."""
    providers: list[BearerAuthProvider] = []
    if args.tokens_file is not None:
        providers.append(_tokens_provider(args.tokens_file))
    jwt_options = (args.leeway, args.jwks_cache_seconds, args.jwks_refresh_cooldown)
    if args.jwks_url is not None or args.jwt_key_file is not None:
        providers.append(_jwt_provider(args))
    elif args.issuer or args.algorithm or any(o is not None for o in jwt_options):
        _fail("--issuer, --algorithm, --leeway and the --jwks-* options need --jwks-url or --jwt-key-file")
    elif args.audience and args.introspection_url is None:
        _fail("--audience needs --jwks-url, --jwt-key-file or --introspection-url")
    if args.introspection_url is not None:
        providers.append(_introspection_provider(args))
    elif args.client_id is not None:
        _fail("--client-id needs --introspection-url")
    if not providers:
        return None
    return providers[0] if len(providers) == 1 else ProviderChain(*providers)


def _parser() -> argparse.ArgumentParser:
    # Usage names the command the user typed; error lines always start "mcp_bearer: error:".
    parser = _ArgumentParser(
        prog=_prog(),
        description="Serve an ASGI app or MCP server behind bearer-token authentication; "
        "without APP, a demo MCP server with a whoami tool. Tokens come from --tokens-file, "
        "else MCP_BEARER_TOKENS (comma-separated), else one random token printed once. "
        f"'{_prog()} keys --help': make, list and revoke API keys.",
    )
    option = parser.add_argument
    option("app", nargs="?", metavar="MODULE:ATTR", help="an ASGI app, or an object with streamable_http_app()")
    option("--version", action="version", version=f"mcp_bearer {__version__}")
    option("--tokens-file", metavar="FILE", help="a keys file (mcp-bearer keys new), or JSON {token: claims}")
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
    option("--authorization-server", action="append", default=[], metavar="URL", help="issuer URL for the metadata")
    option("--jwks-url", metavar="URL", help="also accept JWT access tokens, verified with the issuer's JWKS")
    option("--jwt-key-file", metavar="FILE", help="also accept JWTs, verified with this PEM public key or HMAC secret")
    option("--issuer", action="append", default=[], metavar="ISS", help="accepted JWT iss, repeatable")
    option("--audience", action="append", default=[], metavar="AUD", help="accepted JWT aud, repeatable")
    option(
        "--algorithm", action="append", default=[], metavar="ALG", help="accepted JWT alg, repeatable (default RS256)"
    )
    option("--leeway", type=float, metavar="SECONDS", help="clock skew allowed on exp/nbf/iat (default 30)")
    option("--jwks-cache-seconds", type=float, metavar="SECONDS", help="keep a fetched JWKS this long (default 3600)")
    option("--jwks-refresh-cooldown", type=float, metavar="SECONDS", help="refetch for unknown kids at most this often")
    option(
        "--introspection-url",
        metavar="URL",
        help="also accept opaque tokens, checked at this RFC 7662 endpoint; client secret from $" + _SECRET_VARIABLE,
    )
    option("--client-id", metavar="ID", help="this server's client id at the introspection endpoint")
    option(
        "--cache-ttl", type=float, metavar="SECONDS", help="remember each token's verdict this long (CachedProvider)"
    )
    option("--max-failures", type=int, metavar="N", help="429 for an address after N refused tokens a minute")
    option("--allowed-origin", action="append", metavar="ORIGIN", help="browser origin allowed, repeatable (else any)")
    option("--allowed-host", action="append", default=[], metavar="HOST", help="Host the MCP SDK's guard accepts")
    option("--redis-url", metavar="URL", help=f"share verdicts, revocations, failure counts (or ${_REDIS_VARIABLE})")
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
        app = _load_app(args) if args.app else _demo_app(args)
    except ImportError as exc:
        _fail(f"the demo needs the mcp package ({exc}); pip install mcp")
    # A bad option is the one stderr line below; the ERROR record the middleware logs for lazy
    # builders would print it a second time (logging's last-resort handler writes to stderr).
    logger.disabled = True
    try:
        guarded = BearerAuthMiddleware(
            app,
            provider,
            exclude_paths=DEFAULT_EXCLUDED_PATHS if args.exclude is None else args.exclude,
            required_scopes=args.required_scope,
            resource=args.resource,
            authorization_servers=args.authorization_server,
            allowed_origins=args.allowed_origin,
            max_failures=args.max_failures,
            store=args.store,
            audit=args.audit,
        )
    except (TypeError, ValueError) as exc:
        _flagged(exc)
    finally:
        logger.disabled = False
    if args.resource is not None and not args.authorization_server:  # checked after the URL itself
        _fail("--resource needs --authorization-server: RFC 9728 clients cannot use metadata that names none")
    return guarded


def _described(provider: object) -> list[str]:
    """What the startup banner says of each token source; never a key."""
    if isinstance(provider, ProviderChain):
        return [line for verify in provider._verifiers for line in _described(getattr(verify, "__self__", None))]
    if isinstance(provider, CachedProvider):
        inner = _described(getattr(provider._verify, "__self__", None))
        shared = f", shared through {provider._store!r}" if provider._store else ""
        return [f"{line} (verdicts cached {provider._ttl:g} s{shared})" for line in inner]
    if isinstance(provider, RevocationCheck):
        inner = _described(getattr(provider._verify, "__self__", None))
        return [f"{line} (checked against the deny list in {provider._store!r})" for line in inner]
    if isinstance(provider, StaticTokenProvider):
        where = f" from {provider._file.path} (re-read when it changes)" if provider._file else ""
        return [f"{len(provider._by_digest)} API keys{where}"]
    if isinstance(provider, JWTProvider):
        source = f"JWKS {provider._jwks.url}" if provider._jwks else "a fixed key"
        return [
            f"JWT access tokens from {', '.join(provider._issuer)} ({source}; audience {', '.join(provider._audience)})"
        ]
    if isinstance(provider, IntrospectionProvider):
        return [f"opaque tokens introspected at {provider._url}"]
    return [type(provider).__name__]


def _banner(url: str, provider: BearerAuthProvider, guarded: BearerAuthMiddleware, args: argparse.Namespace) -> str:
    lines = [f"Serving {url} behind bearer-token authentication (Ctrl+C to stop)"]
    lines += [f"  tokens: {line}" for line in _described(provider)]
    if args.required_scope:
        lines.append(f"  required scopes: {' '.join(args.required_scope)}")
    public = [path for path, answer in guarded._open_paths.items() if answer is _PASS]
    lines.append(f"  public paths: {', '.join(public) or '(none)'}")
    if args.resource is not None:
        suffix = urlsplit(args.resource).path.rstrip("/")
        lines.append(
            f"  resource metadata: {urlsplit(url)._replace(path=PROTECTED_RESOURCE_METADATA_PATH + suffix).geturl()}"
        )
    if args.max_failures is not None:
        lines.append(f"  throttle: 429 after {args.max_failures} refused tokens per address per minute")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: ``mcp-bearer`` (console script) or ``python -m mcp_bearer``."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["keys"]:
        return _keys_main(arguments[1:])
    if arguments[:1] == ["revoke"]:
        return _revoke_main(arguments[1:])
    args = _parser().parse_args(arguments)
    generated = None
    try:
        args.store = _cli_store(args.redis_url)
        provider = _cli_provider(args)
        if provider is None:
            tokens, generated = _demo_tokens()
            provider = StaticTokenProvider(tokens)
        if args.cache_ttl is not None:
            provider = CachedProvider(provider, ttl=args.cache_ttl, store=args.store)
        elif args.store is not None:
            provider = RevocationCheck(provider, args.store)
    except (TypeError, ValueError) as exc:
        _flagged(exc)
    except ImportError as exc:
        _fail(str(exc))
    try:
        import uvicorn
    except ImportError:
        _fail("the command line serves with uvicorn, which is not installed: pip install uvicorn")
    guarded = _guarded_app(args, provider)

    if args.audit:  # nothing else configures logging here, and INFO records would go nowhere
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        _audit_logger.addHandler(handler)
        _audit_logger.setLevel(logging.INFO)
        _audit_logger.propagate = False  # mcp 2.x configures the root logger: once, not twice

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
    print(_banner(url, provider, guarded, args), flush=True)
    uvicorn.Server(uvicorn.Config(guarded, log_level="warning")).run(sockets=[listener])


def _cli_store(flag: str | None) -> RedisStore | None:
    url = flag or os.environ.get(_REDIS_VARIABLE) or None
    if url is None:
        return None
    try:
        return RedisStore(url)
    except ValueError as exc:
        _fail(f"--redis-url / ${_REDIS_VARIABLE}: {exc}")


def _revoke_main(argv: list[str]) -> None:
    """``revoke --jti ID --until EXP`` or ``revoke --subject ISS SUB``: written to the shared deny list."""
    parser = _ArgumentParser(
        prog=f"{_prog()} revoke",
        description="Refuse a token (by its jti) or a user's tokens (by issuer and subject) on every replica. "
        "API keys' issuer is mcp_bearer:api-key.",
    )
    parser.add_argument("--jti", metavar="ID", help="the token's jti claim")
    parser.add_argument("--until", type=float, metavar="EXP", help="with --jti: the token's exp (Unix seconds)")
    parser.add_argument("--subject", nargs=2, metavar=("ISS", "SUB"), help="sign this user out everywhere")
    parser.add_argument(
        "--before", type=float, metavar="T", help="with --subject: tokens issued before T (default now)"
    )
    parser.add_argument("--redis-url", metavar="URL", help=f"the replicas' store (or ${_REDIS_VARIABLE})")
    args = parser.parse_args(argv)
    if (args.jti is None) == (args.subject is None):
        _fail("give one of --jti ID --until EXP and --subject ISS SUB")
    if args.jti is not None and args.until is None:
        _fail("--jti needs --until: the token's exp, after which the entry is dropped")
    store = _cli_store(args.redis_url)
    if store is None:
        _fail(f"revoke needs --redis-url or ${_REDIS_VARIABLE}: the store the replicas share")
    try:
        if args.jti is not None:
            store.revoke_jti(args.jti, until=args.until)
        else:
            store.revoke_subject(*args.subject, before=args.before)
    except (TypeError, ValueError) as exc:
        _flagged(exc)
    except OSError as exc:
        _fail(str(exc))
    print("revoked: every replica refuses it within 2 seconds")


# --- the command line: API keys --------------------------------------------------


def _keys_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=f"{_prog()} keys",
        description="Make, list and revoke API keys. A keys file holds only each key's SHA-256, never the key.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{new,list,revoke}")
    new = commands.add_parser("new", help="make a key: printed once, only its digest stored")
    new.add_argument("--file", required=True, metavar="FILE", help="the keys file (made, mode 0600, if missing)")
    new.add_argument("--sub", required=True, help="the subject the key stands for (the sub claim)")
    new.add_argument("--scope", action="append", default=[], metavar="S", help="a scope it grants, repeatable")
    new.add_argument("--expires-in", metavar="DURATION", help="e.g. 90d, 12h, 30m, 3600s (default: never)")
    new.add_argument("--claim", action="append", default=[], metavar="KEY=VALUE", help="another claim, repeatable")
    listing = commands.add_parser("list", help="ids, subjects, scopes, created, expires; never a digest")
    listing.add_argument("--file", required=True, metavar="FILE")
    revoke = commands.add_parser("revoke", help="remove a key; servers watching the file refuse it within 2 s")
    revoke.add_argument("--file", required=True, metavar="FILE")
    revoke.add_argument("id", help="the key id (the 12 hex digits after mcpb_)")
    return parser


def _keys_main(argv: list[str]) -> None:
    args = _keys_parser().parse_args(argv)
    records = _key_records(args.file, missing_ok=args.command == "new")
    if args.command == "list":
        for record in records:
            print(_key_line(record))
        return
    if args.command == "revoke":
        kept = [record for record in records if record.get("id") != args.id]
        if len(kept) == len(records):  # not echoed unless shaped like an id: it may be the key itself, pasted
            named = repr(args.id) if re.fullmatch(r"[0-9a-f]{12}", args.id) else "with that id (12 hex digits)"
            _fail(f"no key {named} in {args.file}")
        _write_key_records(args.file, kept)
        print(f"revoked {args.id}")
        return
    record, key = _new_key_record(args)
    _write_key_records(args.file, [*records, record])
    print(f"{key}\n(shown once: store it now; {args.file} keeps only its digest, id {record['id']})")


def _new_key_record(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    claims: dict[str, Any] = {"sub": args.sub}
    for item in args.claim:
        name, equals, value = item.partition("=")
        if not name or not equals or name in ("sub", "scope", "scopes"):
            _fail(f"--claim {item!r} must be KEY=VALUE, KEY not sub, scope or scopes (they have their own flags)")
        try:
            claims[name] = json.loads(value)
        except ValueError:
            claims[name] = value  # not JSON: the text itself
    try:
        scopes = list(_scope_tokens("--scope", args.scope))
    except (TypeError, ValueError) as exc:
        _fail(str(exc))
    now = int(time.time())
    expires = None
    if args.expires_in is not None:
        duration = _DURATION.fullmatch(args.expires_in)
        if duration is None:
            _fail(f"--expires-in {args.expires_in!r} must be a whole number and a unit, e.g. 90d, 12h, 30m, 3600s")
        expires = now + int(duration[1]) * _DURATION_SECONDS[duration[2]]
    key, key_id = new_api_key()
    record = {
        "id": key_id,
        "sha256": _digest(key).hex(),
        "claims": claims,
        "scopes": scopes,
        "created_at": now,
        "expires_at": expires,
    }
    return record, key


def _key_records(path: str, *, missing_ok: bool) -> list[dict[str, Any]]:
    """The records of a keys file, checked as the server reads them; [] for a new one."""
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except FileNotFoundError:
        if missing_ok:
            return []
        _fail(f"no keys file {path!r}")
    except (OSError, ValueError) as exc:
        _fail(f"cannot read keys file {path!r}: {getattr(exc, 'strerror', None) or exc}")
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        _fail(f'{path} is not a keys file ({{"keys": [...]}}); a plain tokens file holds keys, not digests')
    try:
        _recorded_keys(document["keys"], path)
    except (TypeError, ValueError) as exc:
        _fail(str(exc))
    return list(document["keys"])


def _write_key_records(path: str, records: list[dict[str, Any]]) -> None:
    """Written whole to a temporary file beside it (mode 0600), then renamed over it: readers never see half."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".keys-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump({"keys": records}, file, indent=2)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _key_line(record: Mapping[str, Any]) -> str:
    def when(seconds: object) -> str:
        if not _is_number(seconds):
            return "never"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
        return f"{stamp} (expired)" if seconds < time.time() else stamp

    claims = record.get("claims")
    subject = claims.get("sub") if isinstance(claims, dict) else None
    scopes = " ".join(record.get("scopes") or []) or "-"
    created = when(record.get("created_at")).replace(" (expired)", "")
    expires = when(record.get("expires_at"))
    return f"{record.get('id')}  sub={subject!r}  scopes={scopes}  created={created}  expires={expires}"


if __name__ == "__main__":
    # `python -m mcp_bearer` runs this file as __main__, a copy of the module beside the one a user's
    # server imports: a middleware from here would set another context variable, with another
    # AccessToken class, than the tools read. Use only the real module.
    import mcp_bearer

    mcp_bearer.main()
