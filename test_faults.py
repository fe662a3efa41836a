"""Provider faults under a real server, load with many identities in flight, memory over 100,000
requests: what must hold when things go wrong at scale."""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import sys
import time

import anyio
import pytest

import mcp_bearer
from mcp_bearer import (
    AccessToken,
    BearerAuthMiddleware,
    StaticTokenProvider,
    get_access_token,
)
from support import (
    ALICE_1,
    ALICE_2,
    BOB,
    INITIALIZE,
    MCP_POST_HEADERS,
    NO_ANSWER,
    PREFLIGHT,
    SECRETS,
    TEAM,
    TOKENS,
    FakeProvider,
    Headers,
    Message,
    Receive,
    Scope,
    Send,
    Tally,
    assert_no_secret_logged,
    bearer,
    concurrent_calls,
    httpx,
    identity,
    mcp_app,
    never_receive,
    raw_request,
    serve,
    session_table,
)

# Every test here runs a real server, or 100,000 requests.
pytestmark = pytest.mark.slow


# --- provider faults under a real server ------------------------------------------------


RAISE, HANG, WRONG_TYPE, EXPIRED, SLOW = (
    f"sk-{kind}-Vb7Nq2Lx8Rz4" for kind in ("raise", "hang", "wrongtype", "expired", "slow")
)
SECRETS.update({RAISE, HANG, WRONG_TYPE, EXPIRED, SLOW})


def test_provider_faults_under_a_real_server(caplog: pytest.LogCaptureFixture) -> None:
    provider = FakeProvider(
        {
            RAISE: ConnectionError,  # with the token in its message, as careless provider code does
            WRONG_TYPE: {"sub": "x"},
            EXPIRED: AccessToken(EXPIRED, {"sub": "late"}, expires_at=time.time() - 5),
            HANG: NO_ANSWER,
            SLOW: AccessToken(SLOW, {"sub": "slow"}),
        },
        delay=0.05,  # every verdict takes a while, so verdicts asked for at once must overlap
    )
    reached: list[str | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
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
            with concurrent.futures.ThreadPoolExecutor(25) as pool:
                slow = list(pool.map(lambda _: status(base, SLOW), range(25)))
            assert slow == [200] * 25 and provider.max_in_flight > 1
        assert provider.hang_cancelled.is_set()  # cancelled at shutdown, never answered by the app
    assert HANG not in reached and RAISE not in reached and WRONG_TYPE not in reached and EXPIRED not in reached
    assert reached.count(BOB) == 1 and reached.count(SLOW) == 25
    records = [r for r in caplog.records if r.name == "mcp_bearer" and r.levelno > logging.DEBUG]
    assert len(records) == 3  # one per failure: two raises, one wrong type
    assert all(r.levelno == logging.ERROR for r in records)
    refused = [r.getMessage() for r in caplog.records if r.name == "mcp_bearer" and r.levelno == logging.DEBUG]
    assert refused == ["token refused: 'expired'"]  # a refusal is no failure: only operators read why
    raised = [r.getMessage() for r in records if "raised" in r.getMessage()]
    assert len(raised) == 2 and all("Traceback" in m and "ConnectionError" in m for m in raised)
    assert_no_secret_logged(records)


# --- load: no cross-talk at 100 in flight -----------------------------------------------


def shared_sub(n: int) -> str:
    """Half the tokens have a user of their own; the other half share five users."""
    return f"user-{n}" if n < 25 else f"shared-{n % 5}"


@pytest.mark.anyio
async def test_load_no_cross_talk_at_100_in_flight() -> None:
    """2,000 tool calls from 50 tokens, stateful and stateless, mixed with refused requests."""
    provider = FakeProvider(tokens={token: {"sub": shared_sub(n)} for n, token in enumerate(TEAM)})
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


# --- memory: bounded by the session table, no token left behind -------------------------


def test_memory_stays_bounded_over_100k_requests() -> None:
    """Authorized, refused, excluded, sessions created and deleted: memory is bounded by max_sessions."""
    import gc
    import tracemalloc

    open_sessions = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal open_sessions
        headers = []
        if scope["method"] == "POST" and scope["path"] == "/mcp":
            open_sessions += 1
            headers = [(b"mcp-session-id", b"s%d" % open_sessions)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = BearerAuthMiddleware(app, StaticTokenProvider(TOKENS), max_sessions=100)

    async def noop(message: Message) -> None:
        pass

    def scope(path: str, method: str, headers: Headers) -> Scope:
        return {"type": "http", "method": method, "path": path, "root_path": "", "headers": headers}

    async def drive(rounds: int) -> None:
        for i in range(rounds):
            await middleware(scope("/mcp", "POST", bearer(BOB)), never_receive, noop)  # creates a session
            await middleware(scope("/mcp", "GET", bearer(ALICE_1)), never_receive, noop)
            await middleware(
                scope("/mcp", "DELETE", [*bearer(BOB), (b"mcp-session-id", b"s%d" % open_sessions)]),
                never_receive,
                noop,
            )
            await middleware(scope("/mcp", "POST", bearer(ALICE_2)), never_receive, noop)  # kept until evicted
            await middleware(scope("/mcp", "GET", []), never_receive, noop)
            await middleware(scope("/mcp", "GET", bearer(f"sk-unknown-{i}")), never_receive, noop)
            await middleware(scope("/mcp", "GET", [(b"authorization", b"Bearer a b")]), never_receive, noop)
            await middleware(scope("/health", "GET", []), never_receive, noop)
            await middleware(scope("/mcp", "GET", [(b"mcp-session-id", b"nope"), *bearer(BOB)]), never_receive, noop)
            await middleware(scope("/mcp", "OPTIONS", PREFLIGHT), never_receive, noop)

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

    # The suite's log capture keeps every record it is given: the DEBUG record that says why each of
    # the 10,000 made-up tokens was refused would be the capture's memory, not the middleware's.
    quiet = logging.getLogger("mcp_bearer")
    level = quiet.level
    quiet.setLevel(logging.INFO)  # setLevel, not .level =: loggers cache isEnabledFor
    try:
        before, after = anyio.run(measure)
    finally:
        quiet.setLevel(level)
    sessions = session_table(middleware)
    assert sessions is not None and len(sessions) == 100
    # All the table may hold at its bound: the dict and every key and principal in it (all may be
    # re-allocated while tracing), plus 4 KiB for the interpreter's own caches.
    allowance = sys.getsizeof(sessions) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in sessions.items()) + 4096
    print(f"\nmemory over 100,000 requests: {after - before:+d} bytes (allowed {allowance})")
    assert after - before <= allowance
    assert get_access_token() is None
    assert mcp_bearer._current_token.get() is None  # the context variable itself, private to mcp_bearer
