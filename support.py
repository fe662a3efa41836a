"""What more than one test file needs: the suite's tokens, one fake provider, the direct harness,
one server harness, the SDK's app and client, and the token services the providers are tested against.

A helper that only one file uses lives in that file. Fixtures live in conftest.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import hashlib
import http.client
import importlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, quote_plus, unquote_plus

import anyio
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, ElicitResult, TextContent

from mcp_bearer import (
    AccessToken,
    BearerAuthMiddleware,
    BearerAuthProvider,
    IntrospectionProvider,
    StaticTokenProvider,
    get_access_token,
    require_auth,
)

# The tests adapt to mcp 2.x or 1.x; mypy checks them against 2.x, the version CI type-checks with.
# Context is for the test files' tools: the SDK finds the parameter to fill in by its annotation.
if TYPE_CHECKING:
    import httpx2 as httpx
    from mcp.server.mcpserver import Context as Context
    from mcp.server.mcpserver import MCPServer as Server

    MCP_MAJOR = 2
else:
    try:  # mcp 2.x
        import httpx2 as httpx
        from mcp.server.mcpserver import Context as Context
        from mcp.server.mcpserver import MCPServer as Server

        MCP_MAJOR = 2
    except ImportError:  # mcp 1.x
        import httpx
        from mcp.server.fastmcp import Context as Context
        from mcp.server.fastmcp import FastMCP as Server

        MCP_MAJOR = 1

REPO = os.path.dirname(os.path.abspath(__file__))
# MCP's two protocol generations, and those the installed mcp speaks (1.x: the handshake only). Tests run
# once per generation spoken; a test of a 2026-07-28-only feature is marked modern_only, which conftest
# leaves out on 1.x (deselected, not skipped: it has nothing to check there).
MODERN, HANDSHAKE = "2026-07-28", "2025-11-25"
GENERATIONS = [MODERN, HANDSHAKE] if MCP_MAJOR == 2 else [HANDSHAKE]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


# --- the suite's tokens, and every secret no log may hold ---------------------------

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
# 50 callers for the tests of many identities at once.
TEAM = [f"sk-team-{n:02d}-{hashlib.sha256(str(n).encode()).hexdigest()[:20]}" for n in range(50)]

# Every secret the suite uses; no log record may ever contain one (conftest.py scans them all at the end).
# Test files add their own as they make them.
SECRETS: set[str] = {*TOKENS, *TEAM}

UNAUTHORIZED = {"error": "unauthorized", "error_description": "Authentication required"}
INVALID_TOKEN = {"error": "invalid_token", "error_description": "Token is invalid or expired"}
MALFORMED = {"error": "invalid_request", "error_description": "Malformed Authorization header"}
SERVER_ERROR = {"error": "server_error", "error_description": "Authentication failed unexpectedly"}
NOT_BUILT = "BearerAuthMiddleware cannot be built, so nothing behind it can be served: "
SESSION_NOT_FOUND = {"error": "session_not_found", "error_description": "Session not found"}
UNAVAILABLE = {"error": "temporarily_unavailable", "error_description": "Token verification is temporarily unavailable"}
CHALLENGE_INVALID = 'Bearer error="invalid_token", error_description="Token is invalid or expired"'
CHALLENGE_MALFORMED = 'Bearer error="invalid_request", error_description="Malformed Authorization header"'
# Fetch: a CORS preflight is an OPTIONS with Origin and Access-Control-Request-Method.
PREFLIGHT = [(b"origin", b"https://app.example"), (b"access-control-request-method", b"POST")]


# --- log records -------------------------------------------------------------------


class ListHandler(logging.Handler):
    """Keeps every record it is given, at any level."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def record_text(record: logging.LogRecord) -> str:
    """All a record shows once formatted: message, traceback, stack."""
    text = record.getMessage()
    if record.exc_info:
        text += logging.Formatter().formatException(record.exc_info)
    return text + (record.exc_text or "") + (record.stack_info or "")


def assert_no_secret_logged(records: list[logging.LogRecord]) -> None:
    texts = [(r.name, record_text(r)) for r in records]  # once per record: the suite registers many secrets
    leaks = [(name, s[:8]) for name, text in texts for s in SECRETS if s in text]
    assert not leaks, f"secrets found in log records (logger, token prefix): {leaks}"


@contextlib.contextmanager
def mcp_bearer_log(name: str = "mcp_bearer") -> Iterator[list[logging.LogRecord]]:
    """The records of one logger (and its children) while the block runs."""
    handler = ListHandler()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


# --- one fake provider ---------------------------------------------------------------

STATIC = object()  # FakeProvider's default answer: what StaticTokenProvider(tokens) says
NO_ANSWER = object()  # an answer that never comes: the call waits until it is cancelled


class FakeProvider(BearerAuthProvider):
    """A token service whose every answer the test decides, noting what it was asked and how often at once.

    A token's answer is ``answers[token]`` if listed there, else ``otherwise``, which by default is what
    a real StaticTokenProvider over ``tokens`` (the suite's TOKENS) says. After ``delay`` seconds an
    answer is given as:

    - an exception class: raised, with a message naming the token, as careless provider code does;
    - an exception: raised;
    - NO_ANSWER: never given; ``hanging`` is set when the wait starts, ``hang_cancelled`` when it is cancelled;
    - an AccessToken: a fresh copy, its token filled in if empty, as a token service answers each request anew;
    - any other callable: called at verify time (so "expired" is relative to then); its result as it is;
    - anything else, None or a wrong type: as it is.

    ``calls`` lists every token asked about; ``in_flight`` and ``max_in_flight`` count the calls being
    answered at once (a call that never answers is counted by ``hanging`` instead).
    """

    def __init__(
        self,
        answers: Mapping[str, Any] | None = None,
        *,
        otherwise: Any = STATIC,
        tokens: Mapping[str, Mapping[str, Any]] = TOKENS,
        delay: float = 0.0,
    ) -> None:
        self.answers: dict[str, Any] = dict(answers or {})
        self.otherwise = otherwise
        self.static = StaticTokenProvider(tokens)
        self.delay = delay
        self.calls: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.hanging = threading.Event()
        self.hang_cancelled = threading.Event()

    async def verify_token(self, token: str) -> AccessToken | None:
        self.calls.append(token)
        answer = self.answers.get(token, self.otherwise)
        if answer is NO_ANSWER:
            self.hanging.set()
            try:
                await anyio.sleep_forever()
            finally:
                self.hang_cancelled.set()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await anyio.sleep(self.delay)
            if answer is STATIC:
                return await self.static.verify_token(token)
            if isinstance(answer, type) and issubclass(answer, BaseException):
                raise answer(f"lookup failed for {token}")
            if isinstance(answer, BaseException):
                raise answer
            if isinstance(answer, AccessToken):
                fresh = copy.deepcopy(answer)
                fresh.token = fresh.token or token
                return fresh
            given: AccessToken | None = answer() if callable(answer) else answer
            return given
        finally:
            self.in_flight -= 1


class SyncProvider:
    """A provider whose verify_token is not async: every consumer of providers must refuse it."""

    def verify_token(self, token: str) -> AccessToken | None:
        return None


def verify(provider: BearerAuthProvider, token: str) -> AccessToken | None:
    """One provider call, on an event loop of its own."""
    return anyio.run(provider.verify_token, token)


# --- the middleware called directly, with hand-built scopes -----------------------


@dataclass
class Outcome:
    messages: list[Message]
    app_calls: list[tuple[Scope, AccessToken | None]]
    provider_calls: list[str]

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> Headers:
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


def assert_well_formed_http(messages: list[Message]) -> None:
    """One http.response.start, then body messages, the last with more_body false."""
    assert messages, "no response sent"
    assert messages[0]["type"] == "http.response.start"
    assert isinstance(messages[0]["status"], int)
    assert all(isinstance(n, bytes) and isinstance(v, bytes) for n, v in messages[0].get("headers", []))
    assert len(messages) >= 2
    assert all(m["type"] == "http.response.body" for m in messages[1:])
    assert all(m.get("more_body", False) for m in messages[1:-1])
    assert not messages[-1].get("more_body", False)


async def never_receive() -> Message:
    """For a request whose body no one may read."""
    raise AssertionError("receive() was called")


async def never_send(message: Message) -> None:
    """For a scope no one may answer."""
    raise AssertionError(f"send({message!r}) was called")


class Harness:
    """The middleware around a recording app, called with hand-built scopes."""

    def __init__(
        self,
        provider: BearerAuthProvider | None = None,
        app_status: int = 200,
        *,
        read_body: bool = False,
        **options: Any,
    ) -> None:
        self.provider = provider if provider is not None else FakeProvider()
        self.app_calls: list[tuple[Scope, AccessToken | None]] = []
        self.app_bodies: list[list[Message]] = []  # with read_body: the body messages the app received
        self.app_status = app_status
        self.app_headers: Headers = []
        self.read_body = read_body
        self.middleware = BearerAuthMiddleware(self.app, self.provider, **options)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.app_calls.append((scope, get_access_token()))
        if scope["type"] == "lifespan":
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept"})
            return
        if self.read_body:
            received = [await receive()]
            while received[-1].get("more_body", False):
                received.append(await receive())
            self.app_bodies.append(received)
        await send({"type": "http.response.start", "status": self.app_status, "headers": list(self.app_headers)})
        await send({"type": "http.response.body", "body": b"app"})

    def request(
        self,
        headers: Headers | None = None,
        *,
        path: str = "/mcp",
        method: str = "POST",
        root_path: str = "",
        scope_type: str = "http",
        body: bytes | list[bytes] = b"",
        **extra: Any,
    ) -> Outcome:
        scope: Scope = {
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
        return self.call(scope, body)

    def call(self, scope: Scope, body: bytes | list[bytes] = b"") -> Outcome:
        """One request: its body (a list: one message per part, more_body on all but the last), then a disconnect."""
        messages: list[Message] = []
        calls_before = len(self.app_calls)
        provider_before = len(getattr(self.provider, "calls", []))
        parts = [body] if isinstance(body, bytes) else list(body)
        pending: list[Message] = [
            {"type": "http.request", "body": part, "more_body": n < len(parts) - 1} for n, part in enumerate(parts)
        ]

        async def receive() -> Message:
            return pending.pop(0) if pending else {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            messages.append(message)

        anyio.run(self.middleware, scope, receive, send)
        return Outcome(messages, self.app_calls[calls_before:], getattr(self.provider, "calls", [])[provider_before:])


def bearer(token: str) -> Headers:
    return [(b"authorization", f"Bearer {token}".encode())]


def api_key_principal(subject: str) -> str:
    """The principal of an API key's user, as sessions are bound to it: the keys' own issuer and the subject."""
    return json.dumps(["mcp_bearer:api-key", subject])


def session_table(middleware: BearerAuthMiddleware) -> dict[bytes | str, str] | None:
    """The middleware's bound sessions (session id -> principal), None when binding is off.

    Private to mcp_bearer; the tests read it through here only, so a rename costs one line.
    """
    return None if middleware._sessions is None else middleware._sessions.owners


# --- waiting for something that happens on another thread or task -------------------


def wait_until(condition: Callable[[], object], seconds: float) -> None:
    """Poll ``condition`` until it holds or ``seconds`` pass; the caller asserts what it needs."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.01)


# --- real servers on free loopback ports ------------------------------------------
# A server, not the middleware, turns ASGI messages into bytes on the wire. uvicorn and hypercorn run
# in a thread of this process, so their log records join the suite-wide secret scan; granian runs in
# a process of its own, whose output is scanned for tokens when it stops.

SERVERS = ["uvicorn", "hypercorn-asyncio", "hypercorn-trio", "granian"]


def loopback_listener() -> socket.socket:
    """A listening socket on a free loopback port, made with protocol IPPROTO_TCP rather than 0.

    asyncio turns Nagle's algorithm off only on connections accepted from an IPPROTO_TCP socket;
    otherwise every response waits about 40 ms.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    return socket.socket(listener.family, listener.type, socket.IPPROTO_TCP, fileno=listener.detach())


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def closed_port_url(path: str = "") -> str:
    """A loopback URL nothing listens on: every connection is refused at once."""
    with socket.create_server(("127.0.0.1", 0)) as probe:  # closed on exit
        return f"http://127.0.0.1:{probe.getsockname()[1]}{path}"


@contextlib.contextmanager
def serve(app: Any, listener: socket.socket | None = None, **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield its base URL; stop it."""
    listener = listener or loopback_listener()
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


def announcing_startup(app: Any, started: threading.Event) -> Any:
    """Sets ``started`` once the app has answered lifespan startup (or turned lifespan down)."""

    async def announce(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def observed(message: Message) -> None:
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


ServerStop = list[Callable[[], object]]  # filled by the server's event loop once it can be stopped


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
def serve_hypercorn(app: Any, worker_class: str, root_path: str = "") -> Iterator[str]:
    """hypercorn.asyncio.serve or hypercorn.trio.serve, each in a thread with its own event loop.

    ``root_path`` is hypercorn's ``--root-path`` (``config.root_path``): path is left as sent."""
    import trio
    from hypercorn.asyncio import serve as serve_asyncio
    from hypercorn.config import Config
    from hypercorn.trio import serve as serve_trio

    listener = loopback_listener()
    port = listener.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns the socket from here and closes it
    config.errorlog = logging.getLogger("hypercorn.error")  # into the suite's log capture, not stderr
    config.graceful_timeout = 1
    config.root_path = root_path
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
def serve_granian(factory: str, prefix: str | None = None) -> Iterator[str]:
    """``python -m granian --interface asgi --factory MODULE:FACTORY``, as users run it, in its own process.

    Not granian's embedded server: its Rust threads sometimes abort the interpreter at exit (about one
    run in ten here), which would take the test run with them. Granian binds by host and port only, so
    the port is picked free and the start retried if another process took it in between. With
    ``prefix``, ``--url-path-prefix``: root_path set, path left as sent. The process imports the same
    mcp_bearer as this one (a scratch copy first on the path stays first).
    """
    path = os.pathsep.join(
        dict.fromkeys([os.path.dirname(os.path.abspath(sys.modules["mcp_bearer"].__file__ or REPO)), REPO])
    )
    prefixed = [] if prefix is None else ["--url-path-prefix", prefix]
    with tempfile.TemporaryFile() as output:
        for _attempt in range(3):
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            command = ["--interface", "asgi", "--factory", "--host", "127.0.0.1", "--port", str(port)]
            process = subprocess.Popen(
                [sys.executable, "-m", "granian", *command, *prefixed, factory],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": path},
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


def raw_request(
    base: str, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP/1.1 request; returns (status, lowercase headers dict, body)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


# --- the MCP SDK's own server and client -------------------------------------------

MCP_POST_HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
INITIALIZE = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
).encode()


def mcp_app(*tools: Callable[..., Any], stateless: bool = False, json_response: bool = False) -> Any:
    """The SDK's own streamable HTTP app with these tools, on mcp 2.x or 1.x."""
    if MCP_MAJOR == 2:
        server = Server("test")
        for tool in tools:
            server.tool()(tool)
        return server.streamable_http_app(stateless_http=stateless, json_response=json_response)
    options: dict[str, Any] = {"stateless_http": stateless, "json_response": json_response}  # 1.x: the server's
    server = Server("test", **options)
    for tool in tools:
        server.tool()(tool)
    return server.streamable_http_app()


def fingerprint(token: str) -> str:
    """Tools answer with this, not the token: response bodies reach DEBUG logs (sse_starlette)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def whoami() -> dict[str, Any]:
    """The caller as a sync tool sees it: token fingerprint, claims and scopes."""
    token = require_auth()
    return {"token": fingerprint(token.token), "claims": token.claims, "scopes": token.scopes}


async def whoami_async() -> dict[str, Any]:
    """The same from an async tool, after yielding to the other tasks."""
    await anyio.sleep(0)
    return whoami()


def as_whoami_sees(token: str) -> dict[str, Any]:
    """What whoami answers for one of TOKENS: StaticTokenProvider takes the scopes from the claims."""
    return {"token": fingerprint(token), "claims": TOKENS[token], "scopes": TOKENS[token].get("scopes", [])}


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


@contextlib.asynccontextmanager
async def sdk_client(url: str, generation: str, **http_options: Any) -> AsyncIterator[Any]:
    """The SDK's client over streamable HTTP, speaking ``generation``: mcp 2.x's ``Client`` (its default
    mode probes server/discover, 2026-07-28; "legacy" forces the 2025-11-25 handshake), or mcp 1.x's
    ClientSession. ``http_options`` go to the httpx client."""
    async with httpx.AsyncClient(timeout=20, **http_options) as http:
        transport = streamable_http_client(url, http_client=http)
        if MCP_MAJOR == 2:
            from mcp.client import Client

            async with Client(transport, mode="auto" if generation == MODERN else "legacy") as client:
                assert client.protocol_version == generation
                yield client
        else:
            async with transport as streams, ClientSession(streams[0], streams[1]) as session:
                assert (await session.initialize()).model_dump(by_alias=True)["protocolVersion"] == generation
                yield session


def tool_text(result: CallToolResult) -> str:
    """The text of a tool result's first content block."""
    block = result.content[0]
    assert isinstance(block, TextContent), block
    return block.text


class PendingConfirmation:
    """Alice's ``confirm`` tool, paused on the elicitation it sent her: she declines once released.

    Pass ``answer`` as her session's ``elicitation_callback``; ``while_pending`` runs a forgery
    in between and checks that her tool went on with her own answer, whatever was forged.
    """

    def __init__(self) -> None:
        self.asked, self.released = anyio.Event(), anyio.Event()

    async def answer(self, context: Any, params: Any) -> ElicitResult:
        self.asked.set()
        await self.released.wait()
        return ElicitResult(action="decline")

    async def while_pending(self, session: ClientSession, forge: Callable[[], Awaitable[None]], seconds: float) -> None:
        results: list[CallToolResult] = []
        async with anyio.create_task_group() as group:

            async def call() -> None:
                results.append(await session.call_tool("confirm", {}))

            group.start_soon(call)
            try:
                with anyio.fail_after(seconds):
                    await self.asked.wait()
                await forge()
            finally:
                self.released.set()
        assert json.loads(tool_text(results[0])) == {"action": "decline", "data": None}


async def call_json(session: ClientSession, tool: str) -> Any:
    result = await session.call_tool(tool, {})
    assert not (getattr(result, "is_error", None) or getattr(result, "isError", None)), result
    return json.loads(tool_text(result))


async def claims_echo(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app that answers with the caller's claims as JSON (null on a public path)."""
    if scope["type"] != "http":
        return
    access = get_access_token()
    body = json.dumps(None if access is None else access.claims).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


# --- many identities in flight on one session --------------------------------------


class PerCallToken(httpx.Auth):
    """Sends each tools/call with the token its argument ``n`` names; everything else with ``default``."""

    def __init__(self, tokens: list[str], default: str) -> None:
        self.tokens = tokens
        self.default = default

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
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
            seen = json.loads(tool_text(result))
            expected = fingerprint(tokens[n])
            if seen != {"n": n, "before": expected, "after": expected}:
                tally.mismatches.append(f"call {i}: {seen}")

        async with anyio.create_task_group() as group:
            for i in range(calls):
                group.start_soon(one, i)
    return tally


# --- token services on loopback: a JWKS endpoint and an introspection endpoint ------


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """A test token service's lifespan: nothing to start, nothing to stop."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def hang_until(release: threading.Event, seconds: float = 10) -> None:
    """A token service that stops answering, until its test ends (``release``), or at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not release.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


ISSUER = "https://auth.example.com/"
AUDIENCE = "https://mcp.example.com/mcp"
HMAC_SECRET = "hs-secret-4c1d9e7f2a8b6d3e5f0a9c8b7e6d5f4a3b2c1d0e"  # 46 bytes: over HS256's 32
SECRETS.add(HMAC_SECRET)
DROP = object()  # a claim value meaning "leave the claim out"


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@functools.cache
def private_key(name: str) -> PrivateKey:
    """Keys by name; the first two letters say the type: rs (RSA 2048), ec (P-256), ed (Ed25519)."""
    if name.startswith("rs"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if name.startswith("ec"):
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def public_jwk(name: str, kid: str | None, **members: Any) -> dict[str, Any]:
    kind: dict[str, Any] = {
        "rs": jwt.algorithms.RSAAlgorithm,
        "ec": jwt.algorithms.ECAlgorithm,
        "ed": jwt.algorithms.OKPAlgorithm,
    }
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


class JWKSEndpoint:
    """A JWKS endpoint that counts hits and can fail, hang, redirect, send junk or switch key sets."""

    def __init__(self) -> None:
        self.url = ""  # where the keys are, once served
        self.release = threading.Event()
        self.reset()

    def reset(self) -> None:
        self.release.set()  # a hang left over from the last test ends now, not at its deadline
        self.keys: list[Any] = default_keys()
        self.mode = "ok"  # ok, 500, hang, redirect, garbage, list, nokeys, oversize
        self.paths: list[str] = []
        self.release = threading.Event()

    @property
    def hits(self) -> int:
        return len(self.paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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


def introspector(endpoint: IntrospectionEndpoint, **options: Any) -> IntrospectionProvider:
    settings: dict[str, Any] = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, **options}
    return IntrospectionProvider(endpoint.url, **settings)


# --- verdicts of a token service, for the providers that wrap one -------------------

T1, T2, T3, T4, T5 = (opaque(f"cached-{n}") for n in range(1, 6))


def verdict(sub: str = "dana", expires_in: float | None = 300.0, **claims: Any) -> AccessToken:
    """What a token service says about a good token; the token itself is filled in per request."""
    expires_at = None if expires_in is None else time.time() + expires_in
    return AccessToken("", {"sub": sub, "groups": ["ops", "dev"], **claims}, ["read"], expires_at)
