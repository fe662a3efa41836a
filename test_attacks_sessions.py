"""Attacks on who reaches an MCP session and what reaches the app: a legacy SSE session however its
path is spelled relative to ``root_path``, CORS preflights that could act for anyone, and session
owners that are (issuer, subject) rather than ``sub`` alone.

Every attack runs against the SDK's own apps and clients under real servers (uvicorn, hypercorn,
granian) on both mcp generations. The middleware is built with ``sdk_identity=False`` where it has
the option: the SDK's own owner check would otherwise hide a middleware that lets the wrong
principal through, and the guarantee is the middleware's.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from pydantic import BaseModel

import mcp_bearer
from mcp_bearer import (
    BearerAuthMiddleware,
    BearerAuthProvider,
    JWTProvider,
    ProviderChain,
    StaticTokenProvider,
    require_auth,
)
from support import (
    ALICE_1,
    ALICE_2,
    AUDIENCE,
    BOB,
    INITIALIZE,
    ISSUER,
    MCP_POST_HEADERS,
    SECRETS,
    SESSION_NOT_FOUND,
    Context,
    FakeProvider,
    IntrospectionEndpoint,
    JWKSEndpoint,
    PendingConfirmation,
    Receive,
    Scope,
    Send,
    Server,
    call_json,
    fingerprint,
    httpx,
    introspector,
    loopback_listener,
    mcp_bearer_log,
    mcp_session,
    opaque,
    public_jwk,
    raw_request,
    serve,
    serve_granian,
    serve_hypercorn,
    server_thread,
    session_table,
    sign,
    tool_text,
    wait_until_serving,
    whoami,
)

ROOT = "/api"  # where a proxy mounts the app; servers are told so with root_path / --url-path-prefix
SESSION_SECONDS = 60  # the longest any one SDK session here may take, its attacks included


# --- the apps under attack, built the same way in this process and in granian's -------------


def guarded(app: Any, provider: BearerAuthProvider, **options: Any) -> BearerAuthMiddleware:
    """The middleware as the only guard: the SDK's own session-owner check is off where it can be."""
    if "sdk_identity" in inspect.signature(BearerAuthMiddleware).parameters:
        options.setdefault("sdk_identity", False)
    return BearerAuthMiddleware(app, provider, **options)


class Confirmation(BaseModel):
    ok: bool


async def confirm(ctx: Context) -> str:
    """Asks the caller to confirm, then reports what the answer was."""
    answer = await ctx.elicit("Delete everything?", schema=Confirmation)
    data = getattr(answer, "data", None)
    return json.dumps({"action": answer.action, "data": data and data.model_dump()})


def sdk_server() -> Any:
    server = Server("attacks")
    for tool in (whoami, confirm):
        server.tool()(tool)
    return server


def sse_app() -> Any:
    """The SDK's legacy HTTP+SSE app (GET /sse, POST /messages/), behind the middleware alone."""
    return guarded(sdk_server().sse_app(), FakeProvider())


class Recorder:
    """An ASGI app wrapper that notes every http request that reaches the app: (method, path, query)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls: list[tuple[str, str, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.calls.append((scope["method"], scope["path"], scope.get("query_string", b"")))
        await self.app(scope, receive, send)


# --- servers that take a root path ---------------------------------------------------------------


class StrippingProxy:
    """A reverse proxy that takes ``prefix`` off the request paths that start with it, as nginx's
    ``location /api/ { proxy_pass http://app/; }`` does, and passes the others on as they are: what
    uvicorn ``--root-path`` expects in front of it (uvicorn puts root_path back in front of ``path``).
    One request per connection, Connection: close both ways.
    """

    def __init__(self, upstream: int, prefix: str) -> None:
        self.upstream = upstream
        self.prefix = prefix.encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.forward(reader, writer)
        except asyncio.CancelledError:  # the proxy stops: drop the connection, as a proxy would
            writer.close()

    async def forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        request_line, *fields = head[:-4].split(b"\r\n")
        method, target, version = request_line.split(b" ", 2)
        if target == self.prefix or target[len(self.prefix) : len(self.prefix) + 1] in (b"/", b"?"):
            target = target[len(self.prefix) :] or b"/"
        fields = [f for f in fields if not f.lower().startswith(b"connection:")] + [b"connection: close"]
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        up_writer.write(b" ".join([method, target, version]) + b"\r\n" + b"\r\n".join(fields) + b"\r\n\r\n")
        await asyncio.gather(self.pipe(reader, up_writer), self.pipe(up_reader, writer))

    @staticmethod
    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()


@contextlib.contextmanager
def stripping_proxy(upstream_base: str, prefix: str) -> Iterator[str]:
    """Run a StrippingProxy to ``upstream_base`` in a thread of its own; yield its base URL."""
    proxy = StrippingProxy(int(upstream_base.rsplit(":", 1)[1]), prefix)
    listener = loopback_listener()
    port = listener.getsockname()[1]
    started = threading.Event()
    stops: list[Callable[[], object]] = []

    async def run() -> None:
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        stops.append(lambda: loop.call_soon_threadsafe(stop.set))
        server = await asyncio.start_server(proxy.handle, sock=listener)
        started.set()
        async with server:
            await stop.wait()

    with server_thread("stripping proxy", lambda: asyncio.run(run()), stops) as thread:
        wait_until_serving(port, started, thread, "stripping proxy")
        yield f"http://127.0.0.1:{port}"


ROOTED_SERVERS = ["uvicorn", "hypercorn-asyncio", "hypercorn-trio", "granian"]


@contextlib.contextmanager
def serve_rooted(server: str, factory: str, root_path: str = ROOT) -> Iterator[tuple[str, list[str]]]:
    """The app ``factory`` (MODULE:FUNCTION) builds, served with ``root_path``. Yields the base URL a
    client uses (a URL whose ``root_path`` + "/sse" is the app's /sse) and every base URL an attacker
    may send to (the client's, and the server itself behind the proxy)."""
    if server == "granian":
        with serve_granian(factory, root_path) as base:
            yield base, [base]
        return
    module, _, name = factory.partition(":")
    app = getattr(sys.modules[module], name)()
    if server == "uvicorn":  # uvicorn puts root_path in front of path: it expects a proxy that strips it
        with serve(app, root_path=root_path) as direct, stripping_proxy(direct, root_path) as proxied:
            yield proxied, [proxied, direct]
    else:
        with serve_hypercorn(app, server.removeprefix("hypercorn-"), root_path) as base:
            yield base, [base]


# --- the SDK's own SSE client, with every message its stream brings noted -----------------


@contextlib.asynccontextmanager
async def sse_session(
    url: str, token: str, **session_options: Any
) -> AsyncIterator[tuple[ClientSession, str, list[Any]]]:
    """An initialized ClientSession over the SDK's ``sse_client``; then its session id and every message
    (or error) its stream delivered, in order."""
    ids: list[str] = []
    seen: list[Any] = []
    headers = {"Authorization": f"Bearer {token}"}
    # Bounded: a middleware that refused the owner's own posts would leave initialize waiting forever.
    with anyio.fail_after(SESSION_SECONDS):
        async with sse_client(url, headers=headers, on_session_created=ids.append) as (read, write):
            relay_in, relay_out = anyio.create_memory_object_stream[Any](100)

            async def relay() -> None:
                async with relay_in:
                    async for item in read:
                        seen.append(item)
                        await relay_in.send(item)

            async with anyio.create_task_group() as group:
                group.start_soon(relay)
                async with ClientSession(relay_out, write, **session_options) as session:
                    await session.initialize()
                    yield session, ids[0], seen
                group.cancel_scope.cancel()


def message_ids(seen: list[Any]) -> list[Any]:
    """The JSON-RPC ids of the messages a stream delivered (None for notifications and errors)."""
    ids = []
    for item in seen:
        message = getattr(item, "message", None)
        message = getattr(message, "root", message)  # mcp 1.x wraps the message in a RootModel
        ids.append(getattr(message, "id", None))
    return ids


def post(base: str, token: str | None, target: str, message: Any, method: str = "POST") -> tuple[int, Any]:
    """One message POSTed to ``target`` (path and query); the status and the JSON body, if any."""
    headers = {"content-type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    status, _, body = raw_request(base, method, target, headers, json.dumps(message).encode())
    return status, parsed(body)


def parsed(body: bytes) -> Any:
    """A response body as JSON where it is JSON (the middleware's refusals), else as it came."""
    try:
        return json.loads(body)
    except ValueError:
        return body


def session_queries(victim: str, own: str) -> list[str]:
    """Every query the SDK would route to the session ``victim`` names: Starlette's query parsing, then
    ``UUID(hex=...)``, which takes upper case, braces, ``urn:uuid:`` and hyphens; the last of repeated
    parameters; a percent-encoded name or value."""
    hyphenated = str(uuid.UUID(hex=victim))
    return [
        f"session_id={victim}",
        f"session_id={victim.upper()}",
        f"session_id=%7B{victim}%7D",
        f"session_id=urn:uuid:{hyphenated}",
        f"session_id=urn:uuid:{victim}",
        f"session_id={hyphenated}",
        f"session_id={hyphenated.upper()}",
        f"session_id={own}&session_id={victim}",  # the SDK reads the last
        f"session_id={victim}&session_id={own}",  # a proxy or a framework may read the first
        f"session%5Fid={victim}",
        f"%73ession_id={victim}",
        "session_id=" + "".join(f"%{ord(c):02X}" for c in victim),
        f"x=1&session_id={victim}&y=2",
    ]


def message_paths(root_path: str) -> list[str]:
    """The messages path as a client, a proxy or an attacker may spell it, root_path on or off."""
    return [f"{prefix}{path}" for prefix in (root_path, "") for path in ("/messages/", "/messages", "/messages/x")]


def accepting(request_id: int) -> dict[str, Any]:
    """An answer to the server's elicitation request ``request_id``: yes, go ahead."""
    return {"jsonrpc": "2.0", "id": request_id, "result": {"action": "accept", "content": {"ok": True}}}


def forged_targets(bases: list[str], root_path: str, victim: str, own: str) -> list[tuple[str, str]]:
    """(base, path?query) for every place and spelling a message into ``victim`` could be sent."""
    return [
        (base, f"{path}?{query}")
        for base in bases
        for path in message_paths(root_path)
        for query in session_queries(victim, own)
    ]


# --- 1. a legacy SSE session is its opener's, however the path is spelled ------------------


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("server", ROOTED_SERVERS)
async def test_e2e_sse_under_a_root_path_a_forged_elicitation_answer_is_refused_and_the_owner_decides(
    server: str,
) -> None:
    """Bob answers the confirmation alice's tool asked her for, at every spelling of her session's URL."""
    alice = PendingConfirmation()
    with serve_rooted(server, f"{__name__}:sse_app") as (client_base, bases):
        url = client_base + ROOT + "/sse"
        async with (
            sse_session(url, ALICE_1, elicitation_callback=alice.answer) as (session, victim, _),
            sse_session(url, BOB) as (_, own, _),
        ):
            let_through: list[tuple[str, str, int, Any]] = []

            async def forge() -> None:
                for base, target in forged_targets(bases, ROOT, victim, own):
                    for request_id in range(3):  # the SDK numbers its requests to the client from 0
                        answer = accepting(request_id)
                        status, body = await anyio.to_thread.run_sync(post, base, BOB, target, answer)
                        if (status, body) != (404, SESSION_NOT_FOUND):
                            let_through.append((base, target, status, body))

            await alice.while_pending(session, forge, 20)
            assert let_through == []


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("server", ROOTED_SERVERS)
async def test_e2e_sse_under_a_root_path_a_forged_tool_call_is_404_and_never_reaches_the_owners_stream(
    server: str,
) -> None:
    with serve_rooted(server, f"{__name__}:sse_app") as (client_base, bases):
        async with (
            sse_session(client_base + ROOT + "/sse", ALICE_1) as (session, victim, seen),
            sse_session(client_base + ROOT + "/sse", BOB) as (_, own, bob_seen),
        ):
            targets = forged_targets(bases, ROOT, victim, own)
            let_through = []
            for n, (base, target) in enumerate(targets):
                call = {"jsonrpc": "2.0", "id": 7000 + n, "method": "tools/call", "params": {"name": "whoami"}}
                status, body = await anyio.to_thread.run_sync(post, base, BOB, target, call)
                if (status, body) != (404, SESSION_NOT_FOUND):
                    let_through.append((base, target, status, body))
            # A round trip of alice's own after every forgery: anything they put on her stream is there by now.
            assert json.loads(tool_text(await session.call_tool("whoami", {})))["token"] == fingerprint(ALICE_1)
            forged_ids = set(range(7000, 7000 + len(targets)))
            assert not forged_ids & set(message_ids(seen)), "a forged call's result reached alice's stream"
            assert not forged_ids & set(message_ids(bob_seen))
            assert let_through == []


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn-asyncio", "granian"])
async def test_e2e_sse_under_a_root_path_the_owner_reaches_her_session_in_every_spelling(server: str) -> None:
    """The binding holds for the owner too: her own posts, however spelled, are the SDK's to answer."""
    with serve_rooted(server, f"{__name__}:sse_app") as (client_base, _):
        async with sse_session(client_base + ROOT + "/sse", ALICE_1) as (session, victim, _):
            for query in session_queries(victim, victim)[:7]:
                note = {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}
                status, _ = await anyio.to_thread.run_sync(
                    post, client_base, ALICE_2, f"{ROOT}/messages/?{query}", note
                )
                assert status == 202, query  # her rotated key: same principal
            assert json.loads(tool_text(await session.call_tool("whoami", {})))["token"] == fingerprint(ALICE_1)


# Whatever the server puts in ``path``: the same attacks on hand-built scopes, for root paths and
# spellings no server above produces (a proxy that strips one prefix of two, a mount deeper down).


class StreamingApp:
    """The SDK's SSE transport, reduced to what the middleware watches: a GET opens an event stream whose
    first event names ``root_path + "/messages/?session_id=<hex>"``, open until ``close`` is set; any
    other request is noted in ``reached`` and answered 202."""

    def __init__(self) -> None:
        self.reached: list[tuple[str, bytes]] = []
        self.announced = anyio.Event()
        self.close = anyio.Event()
        self.session = uuid.uuid4().hex

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "GET":
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
            )
            endpoint = f"{quote(scope['root_path'].rstrip('/') + '/messages/')}?session_id={self.session}"
            await send(
                {
                    "type": "http.response.body",
                    "body": f"event: endpoint\r\ndata: {endpoint}\r\n\r\n".encode(),
                    "more_body": True,
                }
            )
            self.announced.set()
            await self.close.wait()
            await send({"type": "http.response.body", "body": b""})
            return
        self.reached.append((scope["path"], scope["query_string"]))
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"Accepted"})


def http_scope(method: str, path: str, root_path: str, query: str, token: str) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": root_path,
        "headers": [(b"authorization", f"Bearer {token}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def one_request(middleware: BearerAuthMiddleware, scope: Scope) -> int:
    sent: list[Any] = []
    body = [{"type": "http.request", "body": b'{"jsonrpc": "2.0", "id": 0, "result": {}}', "more_body": False}]

    async def receive() -> Any:
        return body.pop(0) if body else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    with anyio.fail_after(10):
        await middleware(scope, receive, send)
    return int(sent[0]["status"])


# (root_path, the stream's path as the server gave it): uvicorn puts root_path in front, hypercorn,
# granian and stripping proxies do not.
STREAM_PLACES = [
    ("", "/sse"),
    ("/api", "/api/sse"),
    ("/api", "/sse"),
    ("/api/v1", "/api/v1/sse"),
    ("/api/v1", "/sse"),
    ("/api/v1", "/v1/sse"),
]


def scope_paths(root_path: str) -> list[str]:
    """Every ``path`` a request for the messages path, or any other, may arrive with."""
    spellings = ["/messages/", "/messages", "/messages/x", "/elsewhere", "/", "/sse"]
    prefixes = {"", root_path, root_path + root_path, root_path.rsplit("/", 1)[0], "/v1"}
    return [prefix + spelling for prefix in sorted(prefixes) for spelling in spellings]


@pytest.mark.parametrize(("root_path", "stream_path"), STREAM_PLACES)
def test_a_request_naming_someone_elses_sse_session_is_404_whatever_the_server_puts_in_path(
    root_path: str, stream_path: str
) -> None:
    app = StreamingApp()
    middleware = guarded(app, FakeProvider())
    own = uuid.uuid4().hex  # a session bob may name: not known to the middleware
    let_through: list[tuple[str, str]] = []
    owner_refused: list[tuple[str, str]] = []

    async def attack() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(one_request, middleware, http_scope("GET", stream_path, root_path, "", ALICE_1))
            with anyio.fail_after(10):
                await app.announced.wait()
            for path in scope_paths(root_path):
                for query in session_queries(app.session, own):
                    before = len(app.reached)
                    if (
                        await one_request(middleware, http_scope("POST", path, root_path, query, BOB)) != 404
                        or len(app.reached) != before
                    ):
                        let_through.append((path, query))
                    if await one_request(middleware, http_scope("POST", path, root_path, query, ALICE_2)) == 404:
                        owner_refused.append((path, query))
            app.close.set()

    anyio.run(attack)
    assert let_through == []
    # The owner (a rotated key: same principal) is refused only where she names another session too.
    assert {query for _, query in owner_refused} <= {q for q in session_queries(app.session, own) if own in q}


@pytest.mark.parametrize(("root_path", "stream_path"), STREAM_PLACES)
def test_naming_no_known_session_outside_the_messages_path_is_left_to_the_app(root_path: str, stream_path: str) -> None:
    """The rule is about known sessions: any other session_id parameter is the app's business."""
    app = StreamingApp()
    middleware = guarded(app, FakeProvider())
    statuses: dict[str, int] = {}

    async def elsewhere() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(one_request, middleware, http_scope("GET", stream_path, root_path, "", ALICE_1))
            with anyio.fail_after(10):
                await app.announced.wait()
            for query in (f"session_id={uuid.uuid4().hex}", "session_id=mine", "other=1"):
                statuses[query] = await one_request(middleware, http_scope("POST", "/elsewhere", root_path, query, BOB))
            app.close.set()

    anyio.run(elsewhere)
    assert set(statuses.values()) == {202}


# --- 2. a CORS preflight can never act ---------------------------------------------------------
# Browsers send a preflight without credentials, so the middleware cannot authenticate it; whatever an
# app (or an older SDK release) does with an OPTIONS, it would do for anyone. So the middleware answers
# a real preflight itself and the app never sees it.


@contextlib.contextmanager
def serve_app_rooted(server: str, app: Any, root_path: str = ROOT) -> Iterator[str]:
    """An app object served in this process with ``root_path``; yields a base URL whose ``root_path``
    + path is the app's path (uvicorn behind a stripping proxy, or hypercorn itself)."""
    if server == "uvicorn":
        with serve(app, root_path=root_path) as direct, stripping_proxy(direct, root_path) as proxied:
            yield proxied
    else:
        with serve_hypercorn(app, server.removeprefix("hypercorn-"), root_path) as base:
            yield base


def preflight_headers(variant: int) -> dict[str, str]:
    """Real preflights as browsers and hand-written clients spell them (Fetch: OPTIONS, Origin and
    Access-Control-Request-Method), some carrying what a preflight never needs."""
    variants: list[dict[str, str]] = [
        {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        {"origin": "null", "access-control-request-method": "DELETE"},
        {
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, mcp-session-id",
            "content-type": "application/json",
        },
        {"ORIGIN": "https://app.example", "ACCESS-CONTROL-REQUEST-METHOD": "GET", "Authorization": f"Bearer {BOB}"},
    ]
    return variants[variant % len(variants)]


def no_options_reached(recorder: Recorder) -> list[tuple[str, str, bytes]]:
    return [call for call in recorder.calls if call[0] == "OPTIONS"]


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn-asyncio"])
async def test_e2e_an_anonymous_preflight_carrying_an_elicitation_answer_never_reaches_the_sse_app(
    server: str,
) -> None:
    alice = PendingConfirmation()
    recorder = Recorder(sdk_server().sse_app())
    with serve_app_rooted(server, guarded(recorder, FakeProvider())) as base:
        url = base + ROOT + "/sse"
        async with sse_session(url, ALICE_1, elicitation_callback=alice.answer) as (session, victim, _):
            answered: list[tuple[int, dict[str, str], bytes]] = []

            async def forge() -> None:
                targets = [f"{p}?{q}" for p in message_paths(ROOT) for q in session_queries(victim, victim)[:4]]
                for n, target in enumerate(targets):
                    body = json.dumps(accepting(n % 3)).encode()
                    answer = await anyio.to_thread.run_sync(
                        raw_request, base, "OPTIONS", target, preflight_headers(n), body
                    )
                    answered.append(answer)

            await alice.while_pending(session, forge, 20)
            assert no_options_reached(recorder) == []
            assert {(status, body) for status, _, body in answered} == {(204, b"")}


def sdk_streamable_app() -> tuple[Any, Any]:
    """The SDK's stateful streamable HTTP app and its session manager, whose ``_server_instances`` are its sessions."""
    server = sdk_server()
    app = server.streamable_http_app()
    return app, server.session_manager


# The middleware's own answer (Fetch: "*" allows any method and header but Authorization, named).
ALLOWED = (("allow-headers", "authorization, *"), ("allow-methods", "*"), ("allow-origin", "*"), ("max-age", "600"))
PREFLIGHT_ANSWER = (204, tuple((f"access-control-{name}", value) for name, value in ALLOWED), b"")


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def preflights(base: str, count: int, session_id: str) -> list[tuple[int, list[tuple[str, str]], bytes]]:
    """``count`` anonymous preflights on one keep-alive connection, cycling through spellings, queries,
    session ids and bodies; each answer as (status, headers but Date and Server, body)."""
    import http.client

    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=20)
    answers = []
    bodies = [
        b"",
        INITIALIZE,
        json.dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "whoami"}}).encode(),
    ]
    try:
        for n in range(count):
            headers = preflight_headers(n)
            if n % 3 == 1:
                headers = {**headers, **MCP_POST_HEADERS, "mcp-session-id": session_id if n % 2 else uuid.uuid4().hex}
            target = "/mcp" if n % 5 == 0 else f"/mcp?session_id={session_id}&n={n}"
            connection.request("OPTIONS", target, body=bodies[n % 3], headers=headers)
            response = connection.getresponse()
            kept = [(k.lower(), v) for k, v in response.getheaders() if k.lower() not in ("date", "server")]
            answers.append((response.status, sorted(kept), response.read()))
    finally:
        connection.close()
    return answers


@pytest.mark.slow
@pytest.mark.anyio
async def test_e2e_3000_anonymous_preflights_open_no_mcp_session_and_never_reach_the_app() -> None:
    app, manager = sdk_streamable_app()
    recorder = Recorder(app)
    session_ids: list[str] = []

    async def note_session(response: httpx.Response) -> None:
        if "mcp-session-id" in response.headers:
            session_ids.append(response.headers["mcp-session-id"])

    with serve(guarded(recorder, FakeProvider()), root_path=ROOT) as base:
        with anyio.fail_after(SESSION_SECONDS):
            async with mcp_session(base + "/mcp", ALICE_1, event_hooks={"response": [note_session]}) as (session, _):
                assert len(manager._server_instances) == 1  # alice's
                await anyio.to_thread.run_sync(preflights, base, 200, session_ids[0])  # warm up allocator and caches
                before = rss_bytes()
                answers = await anyio.to_thread.run_sync(preflights, base, 3000, session_ids[0])
                grown = rss_bytes() - before
                assert no_options_reached(recorder) == []
                assert len(manager._server_instances) == 1
                assert not [headers for _, headers, _ in answers if "mcp-session-id" in dict(headers)]
                # Query string, session id and body make no difference: one answer, the middleware's.
                assert {(status, tuple(headers), body) for status, headers, body in answers} == {PREFLIGHT_ANSWER}
                assert grown < 24 * 1024 * 1024, f"RSS grew by {grown / 1024 / 1024:.1f} MiB over 3,000 preflights"
                assert json.loads(tool_text(await session.call_tool("whoami", {})))["token"] == fingerprint(ALICE_1)


@pytest.mark.slow
def test_e2e_with_allow_cors_preflight_false_a_preflight_is_an_ordinary_request_and_refused() -> None:
    app, manager = sdk_streamable_app()
    recorder = Recorder(app)
    with serve(guarded(recorder, FakeProvider(), allow_cors_preflight=False), root_path=ROOT) as base:
        for n in range(3):  # anonymous, as browsers send them
            status, headers, _ = raw_request(base, "OPTIONS", f"/mcp?n={n}", preflight_headers(n), INITIALIZE)
            assert (status, headers.get("www-authenticate")) == (401, "Bearer"), n
    assert no_options_reached(recorder) == []
    assert manager._server_instances == {}


# --- 3. a session's owner is (issuer, subject), not sub alone -----------------------------------
# RFC 7519 4.1.2: sub is unique only within its issuer. Two trusted issuers may each have an "alice";
# an API key file may name "alice" too. None of them may use, or end, another's session.

ISSUER_A = ISSUER
ISSUER_B = "https://login.other.example/"
KEY_ALICE_1 = "sk-key-alice-1-Vb7Nq2Lw9Xe4Rt6Yp"
KEY_ALICE_2 = "sk-key-alice-2-Mz3Kc8Hs1Jd5Fg0Qa"
OPAQUE_ALICE = opaque("alice-at-the-introspection-endpoint")
OPAQUE_ALICE_2 = opaque("alice-again-at-the-introspection-endpoint")
OPAQUE_ALICE_B = opaque("alice-at-the-other-introspection-endpoint")
SECRETS.update({KEY_ALICE_1, KEY_ALICE_2})


@pytest.fixture(scope="module")
def jwks_b_server() -> Iterator[JWKSEndpoint]:
    endpoint = JWKSEndpoint()
    with serve(endpoint) as base:
        endpoint.url = base + "/keys"
        yield endpoint


@pytest.fixture
def jwks_b(jwks_b_server: JWKSEndpoint) -> Iterator[JWKSEndpoint]:
    """Issuer B's JWKS endpoint: a key of its own."""
    jwks_b_server.reset()
    jwks_b_server.keys = [public_jwk("rs2", "rsa-b")]
    yield jwks_b_server
    jwks_b_server.release.set()


def idp(endpoint: JWKSEndpoint, issuer: str | list[str] = ISSUER_A) -> JWTProvider:
    return JWTProvider(issuer=issuer, audience=AUDIENCE, jwks_url=endpoint.url)


def alice_of(issuer: str, n: int, **options: Any) -> str:
    """A JWT for subject "alice" of ``issuer``; each ``n`` a different token of hers."""
    return sign(iss=issuer, sub="alice", jti=f"{issuer}#{n}", **options)


@dataclass
class Principals:
    """Who is trusted, and three valid tokens: two of the session's owner, one of another principal
    whose ``sub`` is the owner's."""

    provider: BearerAuthProvider
    owner: str
    owner_again: str  # the same issuer and subject: a rotated key, a refreshed token
    intruder: str


@dataclass
class Services:
    """The token services of the cases: issuer A's and B's JWKS, two introspection endpoints."""

    jwks: JWKSEndpoint
    jwks_b: JWKSEndpoint
    introspection: IntrospectionEndpoint
    introspection_b: IntrospectionEndpoint


@pytest.fixture(scope="module")
def introspection_b_server() -> Iterator[IntrospectionEndpoint]:
    endpoint = IntrospectionEndpoint()
    with serve(endpoint) as base:
        endpoint.url = base + "/introspect"
        yield endpoint


@pytest.fixture
def services(
    jwks: JWKSEndpoint,
    jwks_b: JWKSEndpoint,
    introspection: IntrospectionEndpoint,
    introspection_b_server: IntrospectionEndpoint,
) -> Iterator[Services]:
    introspection_b_server.reset()
    yield Services(jwks, jwks_b, introspection, introspection_b_server)
    introspection_b_server.release.set()


def principals(case: str, services: Services) -> Principals:
    jwks, jwks_b, introspection = services.jwks, services.jwks_b, services.introspection
    api_keys = StaticTokenProvider(
        # A key file may put anything in claims, an IdP's issuer included: it never becomes that issuer.
        {KEY_ALICE_1: {"sub": "alice", "iss": ISSUER_A}, KEY_ALICE_2: {"sub": "alice"}}
    )
    if case == "two-idps":
        intruder = alice_of(ISSUER_B, 1, key="rs2", kid="rsa-b")
        return Principals(
            ProviderChain(idp(jwks), idp(jwks_b, ISSUER_B)), alice_of(ISSUER_A, 1), alice_of(ISSUER_A, 2), intruder
        )
    if case == "one-idp-two-issuers":
        provider = idp(jwks, [ISSUER_A, ISSUER_B])
        return Principals(provider, alice_of(ISSUER_A, 1), alice_of(ISSUER_A, 2), alice_of(ISSUER_B, 1))
    if case == "api-key-beside-idp":
        return Principals(ProviderChain(api_keys, idp(jwks)), alice_of(ISSUER_A, 1), alice_of(ISSUER_A, 2), KEY_ALICE_1)
    if case == "idp-beside-api-key":
        return Principals(ProviderChain(api_keys, idp(jwks)), KEY_ALICE_1, KEY_ALICE_2, alice_of(ISSUER_A, 1))
    introspected: dict[str, Any] = {"active": True, "sub": "alice", "scope": "read"}
    if case == "two-introspections-without-iss":  # RFC 7662: iss is optional; the chain tells them apart
        introspection.answers.update({OPAQUE_ALICE: introspected, OPAQUE_ALICE_2: introspected})
        services.introspection_b.answers[OPAQUE_ALICE_B] = introspected
        chain = ProviderChain(introspector(introspection), introspector(services.introspection_b))
        return Principals(chain, OPAQUE_ALICE, OPAQUE_ALICE_2, OPAQUE_ALICE_B)
    if case == "introspection-of-issuer-b":
        introspected["iss"] = ISSUER_B
    introspection.answers[OPAQUE_ALICE] = introspected
    chain = ProviderChain(idp(jwks), introspector(introspection))
    return Principals(chain, alice_of(ISSUER_A, 1), alice_of(ISSUER_A, 2), OPAQUE_ALICE)


PRINCIPAL_CASES = [
    "two-idps",
    "one-idp-two-issuers",
    "api-key-beside-idp",
    "idp-beside-api-key",
    "introspection-without-iss",
    "introspection-of-issuer-b",
    "two-introspections-without-iss",
]


def who() -> dict[str, Any]:
    """The caller as the public API names it: the key a tool would bind its own handles to."""
    return {"principal": mcp_bearer.principal_key(), "token": fingerprint(require_auth().token)}


def audited(records: list[logging.LogRecord]) -> list[tuple[str, str | None]]:
    """(outcome, principal) of each audit record, from the fields JSON formatters read."""
    return [(vars(r)["mcp_bearer"]["outcome"], vars(r)["mcp_bearer"]["principal"]) for r in records]


def principals_app(provider: BearerAuthProvider) -> tuple[BearerAuthMiddleware, Any]:
    server = Server("principals")
    server.tool()(who)
    server.tool()(confirm)
    middleware = guarded(server.streamable_http_app(), provider, audit=True)
    return middleware, server


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("case", PRINCIPAL_CASES)
async def test_e2e_streamable_http_a_session_is_its_issuer_and_subjects_not_another_issuers_same_sub(
    case: str, services: Services
) -> None:
    tokens = principals(case, services)
    middleware, _ = principals_app(tokens.provider)
    session_ids: list[str] = []

    async def note_session(response: httpx.Response) -> None:
        if "mcp-session-id" in response.headers:
            session_ids.append(response.headers["mcp-session-id"])

    with mcp_bearer_log("mcp_bearer.audit") as records, serve(middleware, root_path=ROOT) as base:
        with anyio.fail_after(SESSION_SECONDS):
            async with mcp_session(base + "/mcp", tokens.owner, event_hooks={"response": [note_session]}) as (
                session,
                client,
            ):
                call = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "who", "arguments": {}}}
                headers = {**MCP_POST_HEADERS, "mcp-session-id": session_ids[0], "mcp-protocol-version": "2025-06-18"}
                intruding = {**headers, "Authorization": f"Bearer {tokens.intruder}"}
                status, _, body = raw_request(base, "POST", "/mcp", intruding, json.dumps(call).encode())
                assert (status, parsed(body)) == (404, SESSION_NOT_FOUND)
                status, _, body = raw_request(base, "DELETE", "/mcp", intruding)
                assert (status, parsed(body)) == (404, SESSION_NOT_FOUND)  # nor may the intruder end it
                owner = (await call_json(session, "who"))["principal"]
                assert session_table(middleware) == {session_ids[0].encode(): owner}
                client.headers["Authorization"] = f"Bearer {tokens.owner_again}"
                again = await call_json(session, "who")
                assert again == {
                    "principal": owner,
                    "token": fingerprint(tokens.owner_again),
                }  # rotation: one principal
    # The session table, principal_key() and the audit trail name one and the same principal.
    intruder_principal = mcp_bearer.principal_key(await tokens.provider.verify_token(tokens.intruder))
    assert intruder_principal != owner
    trail = audited(records)
    assert {principal for outcome, principal in trail if outcome == "allowed"} == {owner}
    assert [principal for outcome, principal in trail if outcome.startswith("404")] == [intruder_principal] * 2


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("case", PRINCIPAL_CASES)
async def test_e2e_legacy_sse_a_session_is_its_issuer_and_subjects_not_another_issuers_same_sub(
    case: str, services: Services
) -> None:
    tokens = principals(case, services)
    server = Server("principals")
    server.tool()(who)
    middleware = guarded(server.sse_app(), tokens.provider, audit=True)
    with mcp_bearer_log("mcp_bearer.audit") as records, serve_app_rooted("hypercorn-asyncio", middleware) as base:
        async with sse_session(base + ROOT + "/sse", tokens.owner) as (session, victim, seen):
            call = {"jsonrpc": "2.0", "id": 4242, "method": "tools/call", "params": {"name": "who", "arguments": {}}}
            target = f"{ROOT}/messages/?session_id={victim}"
            assert await anyio.to_thread.run_sync(post, base, tokens.intruder, target, call) == (404, SESSION_NOT_FOUND)
            owner = (await call_json(session, "who"))["principal"]
            note = {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}
            assert (await anyio.to_thread.run_sync(post, base, tokens.owner_again, target, note))[0] == 202
            assert (await call_json(session, "who"))["principal"] == owner
            assert 4242 not in message_ids(seen)
    intruder_principal = mcp_bearer.principal_key(await tokens.provider.verify_token(tokens.intruder))
    trail = audited(records)
    assert owner != intruder_principal
    assert {principal for outcome, principal in trail if outcome == "allowed"} == {owner}
    assert [principal for outcome, principal in trail if outcome.startswith("404")] == [intruder_principal]
