"""A session belongs to the principal that opened it: Streamable HTTP's mcp-session-id, the legacy
HTTP+SSE transport's session_id, and many identities in flight on one session."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from pydantic import BaseModel

from mcp_bearer import (
    BearerAuthMiddleware,
    BearerAuthProvider,
    get_access_token,
)
from support import (
    ALICE_1,
    ALICE_2,
    BOB,
    CAROL_NO_SUB,
    MCP_POST_HEADERS,
    SESSION_NOT_FOUND,
    TEAM,
    TOKENS,
    Context,
    FakeProvider,
    Harness,
    Headers,
    PendingConfirmation,
    Receive,
    Scope,
    Send,
    Server,
    Tally,
    api_key_principal,
    as_whoami_sees,
    bearer,
    call_json,
    concurrent_calls,
    fingerprint,
    httpx,
    identity,
    mcp_app,
    mcp_session,
    raw_request,
    serve,
    session_table,
    until,
    whoami,
    whoami_async,
)

# --- streamable HTTP: mcp-session-id is bound to its creator ----------------------------


class SessionHarness(Harness):
    """The middleware around an app that creates a session on POST without one, and answers 404 for a
    session it forgot (``known_sessions``), as the SDK's session manager does."""

    def __init__(self, provider: BearerAuthProvider | None = None, **options: Any) -> None:
        self.known_sessions: set[bytes] = set()
        super().__init__(provider, **options)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.app_calls.append((scope, get_access_token()))
        sid = dict(scope["headers"]).get(b"mcp-session-id")
        if sid is None:
            sid = b"sid-%d" % len(self.app_calls)
            self.known_sessions.add(sid)
            status = 200
        elif sid not in self.known_sessions:
            status = 404
        elif scope["method"] == "DELETE":
            self.known_sessions.discard(sid)
            status = 200
        else:
            status = 200
        await send({"type": "http.response.start", "status": status, "headers": [(b"mcp-session-id", sid)]})
        await send({"type": "http.response.body", "body": b"{}"})


def with_session(headers: Headers, sid: str | None) -> Headers:
    assert sid, "the app created no session"
    return [*headers, (b"mcp-session-id", sid.encode())]


def test_a_session_belongs_to_the_principal_that_created_it() -> None:
    harness = SessionHarness()
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
    # Another token of the same person (same email, no sub either) is another principal.
    tokens = {CAROL_NO_SUB: TOKENS[CAROL_NO_SUB], "sk-other": {"email": "carol@example.com"}}
    harness = SessionHarness(FakeProvider(tokens=tokens))
    sid = harness.request(bearer(CAROL_NO_SUB)).header("mcp-session-id")
    assert sid and harness.request(with_session(bearer(CAROL_NO_SUB), sid)).status == 200
    assert harness.request(with_session(bearer("sk-other"), sid)).status == 404


def test_unknown_and_duplicated_session_ids_are_refused() -> None:
    harness = SessionHarness()
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
    harness = SessionHarness()
    sid = harness.request(bearer(BOB)).header("mcp-session-id")
    assert sid
    assert harness.request(with_session(bearer(BOB), sid), method="DELETE").status == 200
    assert session_table(harness.middleware) == {}
    sid = harness.request(bearer(BOB)).header("mcp-session-id")
    assert sid
    harness.known_sessions.discard(sid.encode())  # the app expired it
    assert harness.request(with_session(bearer(BOB), sid)).status == 404
    assert session_table(harness.middleware) == {}


def test_session_table_is_bounded_oldest_first() -> None:
    harness = SessionHarness(max_sessions=3)
    sids = [harness.request(bearer(BOB)).header("mcp-session-id") for _ in range(5)]
    assert all(sids)
    assert list(session_table(harness.middleware) or ()) == [str(s).encode() for s in sids[2:]]
    assert harness.request(with_session(bearer(BOB), sids[0])).status == 404
    assert harness.request(with_session(bearer(BOB), sids[4])).status == 200


def test_bind_sessions_false_leaves_sessions_to_the_app() -> None:
    harness = SessionHarness(bind_sessions=False)
    sid = harness.request(bearer(ALICE_1)).header("mcp-session-id")
    assert sid and harness.request(with_session(bearer(BOB), sid)).status == 200


@pytest.mark.slow
@pytest.mark.anyio
async def test_e2e_second_principal_on_first_principals_session_gets_404(stateful_url: str) -> None:
    session_ids: list[str] = []

    async def note_session(response: httpx.Response) -> None:
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


# --- identity under concurrency on one session ------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_e2e_20_concurrent_calls_on_one_session_each_see_their_own_token() -> None:
    """mcp 1.x answered every call on a stateful session with its first request's token (SDK #2208)."""
    tokens = TEAM[:20]
    provider = FakeProvider(tokens={token: {"sub": "team"} for token in tokens})
    with serve(BearerAuthMiddleware(mcp_app(identity), provider)) as base:
        tally = await concurrent_calls(base + "/mcp", tokens, calls=20, limit=anyio.Semaphore(20))
    assert tally == Tally(calls=20)
    assert set(provider.calls) == set(tokens)


# --- the legacy HTTP+SSE transport: a session belongs to whoever opened its stream ------
# GET /sse opens a stream whose first event names /messages/?session_id=<hex>; POSTs to that URL land on
# the stream. Without binding, any valid token could post into someone else's session, or answer the
# owner's elicitation (server-to-client request ids are small counters), as the SDK's own auth forbids.


class Confirmation(BaseModel):
    ok: bool


async def confirm(ctx: Context) -> str:
    """Asks the caller to confirm, then reports who answered what."""
    answer = await ctx.elicit("Delete everything?", schema=Confirmation)
    data = getattr(answer, "data", None)  # only an accepted answer has data
    return json.dumps({"action": answer.action, "data": data and data.model_dump()})


def sse_app(*tools: Callable[..., Any]) -> Any:
    """The SDK's own legacy SSE app (GET /sse, POST /messages/) with these tools, on mcp 2.x or 1.x."""
    server = Server("test")
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
    with serve(BearerAuthMiddleware(sse_app(whoami, whoami_async, confirm), FakeProvider())) as base:
        yield base


@pytest.mark.slow
@pytest.mark.anyio
async def test_e2e_sse_client_works_and_each_caller_sees_their_own_claims(sse_base: str) -> None:
    async with sse_session(sse_base, BOB) as (bob, _), sse_session(sse_base, CAROL_NO_SUB) as (carol, _):
        for tool in ("whoami", "whoami_async"):
            assert await call_json(bob, tool) == as_whoami_sees(BOB)
            assert await call_json(carol, tool) == as_whoami_sees(CAROL_NO_SUB)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.anyio
async def test_e2e_sse_without_sub_the_session_belongs_to_the_token_not_the_person() -> None:
    tokens = {CAROL_NO_SUB: {"email": "carol@example.com"}, ALICE_2: {"email": "carol@example.com"}}
    with serve(BearerAuthMiddleware(sse_app(whoami), FakeProvider(tokens=tokens))) as base:
        async with sse_session(base, CAROL_NO_SUB) as (session, victim):
            status, _, _ = post_message(base, ALICE_2, f"session_id={victim}", TOOL_CALL)
            assert status == 404
            status, _, _ = post_message(base, CAROL_NO_SUB, f"session_id={victim.upper()}", TOOL_CALL)
            assert status == 202  # the owner's own post, in another spelling, reaches the SDK
            assert (await call_json(session, "whoami"))["token"] == fingerprint(CAROL_NO_SUB)


@pytest.mark.slow
@pytest.mark.anyio
async def test_e2e_sse_a_forged_elicitation_answer_is_refused_and_the_owner_decides(sse_base: str) -> None:
    """Bob answers the confirmation alice's tool asked her for: her tool must go on with her answer."""
    alice = PendingConfirmation()
    async with sse_session(sse_base, ALICE_1, elicitation_callback=alice.answer) as (session, victim):

        async def forge() -> None:
            for request_id in range(10):  # the SDK numbers its requests to the client from 0
                answer = {"jsonrpc": "2.0", "id": request_id, "result": {"action": "accept", "content": {"ok": True}}}
                status = await anyio.to_thread.run_sync(post_message, sse_base, BOB, f"session_id={victim}", answer)
                assert status[0] == 404

        await alice.while_pending(session, forge, 10)


@pytest.mark.slow
@pytest.mark.anyio
async def test_e2e_sse_binding_ends_with_the_stream_and_the_table_stays_bounded() -> None:
    middleware = BearerAuthMiddleware(sse_app(whoami), FakeProvider(), max_sessions=2)
    with serve(middleware) as base:
        async with sse_session(base, ALICE_1) as (_, first_id):
            assert session_table(middleware) == {first_id: api_key_principal("alice")}
            async with sse_session(base, ALICE_1) as (_, second_id), sse_session(base, BOB) as (third, third_id):
                assert set(session_table(middleware) or ()) == {second_id, third_id}  # the oldest was forgotten
                # Forgotten is refused, even for its owner, rather than left unguarded: they reconnect.
                assert post_message(base, ALICE_1, f"session_id={first_id}", TOOL_CALL)[0] == 404
                assert (await call_json(third, "whoami"))["claims"]["sub"] == "bob"
            await until(lambda: session_table(middleware) == {})  # the server notices the client left
        await until(lambda: session_table(middleware) == {})


def test_an_app_without_the_sse_transport_keeps_its_own_session_id_parameter() -> None:
    harness = Harness()
    for query in (b"session_id=mine", b"session_id=a&session_id=b", b"session_id=" + uuid.uuid4().hex.encode()):
        outcome = harness.request(bearer(BOB), path="/messages/", query_string=query)
        assert outcome.status == 200 and outcome.body == b"app", query
