"""Token guessing, slowed down: ``max_failures`` refused tokens from one client address within
``failure_window`` seconds, and that address's further token-bearing requests get 429 with
Retry-After (RFC 6585 section 4, RFC 9110 section 10.2.3) until the window has passed, the provider
unasked. A token accepted within the window is never throttled (a valid user behind the same NAT);
requests without a token are not counted; the tables are bounded.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_bearer import AccessToken, BearerAuthMiddleware, ProviderUnavailable
from support import (
    ALICE_1,
    ALICE_2,
    BOB,
    MCP_MAJOR,
    SECRETS,
    FakeProvider,
    Harness,
    Message,
    Outcome,
    Scope,
    bearer,
    call_json,
    fingerprint,
    mcp_app,
    mcp_bearer_log,
    mcp_session,
    raw_request,
    serve,
    whoami,
)
from test_cli_operator import DISCOVERY, post_initialize, served, tokens_file, user_module, whoami_on_both_generations

GUESSES = [f"sk-guess-{n:03d}-Wd8Lq2Zx" for n in range(200)]
DOWN, CRASH = "sk-down-Kq3Vb7Tz", "sk-crash-Pm5Xw2Rd"
SECRETS.update({*GUESSES, DOWN, CRASH})
TOO_MANY = {"error": "too_many_requests", "error_description": "Too many refused tokens from this address; retry later"}
ATTACKER, NEIGHBOUR = "198.51.100.7", "203.0.113.9"  # RFC 5737 documentation addresses


def guesses() -> Iterator[str]:
    return iter(GUESSES)


def throttled(max_failures: int = 3, window: float = 60.0, **options: Any) -> Harness:
    provider = FakeProvider({DOWN: ProviderUnavailable("IdP down"), CRASH: RuntimeError})
    return Harness(provider, max_failures=max_failures, failure_window=window, **options)


def send(harness: Harness, token: str | None, address: str = ATTACKER, **request: Any) -> Outcome:
    headers = bearer(token) if token is not None else []
    return harness.request(headers + request.pop("headers", []), client=(address, 40000), **request)


def assert_too_many(outcome: Outcome, window: float = 60.0) -> None:
    assert (outcome.status, outcome.json()) == (429, TOO_MANY)
    assert outcome.header("content-type") == "application/json" and outcome.header("www-authenticate") is None
    retry_after = outcome.header("retry-after")
    assert retry_after is not None and retry_after.isdigit() and 1 <= int(retry_after) <= math.ceil(window)
    assert outcome.provider_calls == [] and outcome.app_calls == []


def spray(harness: Harness, count: int, address: str = ATTACKER, tokens: Iterator[str] | None = None) -> list[int]:
    tokens = tokens or guesses()
    return [send(harness, next(tokens), address).status for _ in range(count)]


# --- the rule ----------------------------------------------------------------------------


def test_after_max_failures_refusals_an_address_gets_429_and_the_provider_is_not_asked() -> None:
    harness = throttled()
    tokens = guesses()
    assert spray(harness, 3, tokens=tokens) == [401, 401, 401]
    assert len(harness.provider.calls) == 3  # type: ignore[attr-defined]
    for token in (next(tokens), next(tokens), ALICE_1):  # a valid key never accepted here is no exception
        assert_too_many(send(harness, token))
    assert_too_many(send(harness, BOB, method="GET", path="/elsewhere"))
    assert_too_many(send(harness, BOB, method="DELETE", root_path="/api", path="/api/mcp"))
    # A websocket handshake carries a token too (RFC 6455 4.2.2: the server may answer with any status).
    handshake = send(harness, BOB, scope_type="websocket", extensions={"websocket.http.response": {}})
    assert (handshake.status, handshake.provider_calls) == (429, [])
    closed = send(harness, BOB, scope_type="websocket")
    assert (closed.messages, closed.provider_calls) == ([{"type": "websocket.close", "code": 1008}], [])
    assert len(harness.provider.calls) == 3  # type: ignore[attr-defined]
    # Another address is its own budget.
    assert send(harness, next(tokens), NEIGHBOUR).status == 401
    assert send(harness, BOB, NEIGHBOUR).status == 200


def test_requests_without_a_token_are_not_counted_nor_throttled() -> None:
    """Counting them would let anyone lock an address out without guessing anything, and a client's
    first, tokenless request (the MCP authorization flow starts with one) would use up its budget."""
    harness = throttled()
    for headers in ([], [(b"authorization", b"Basic YTpi")], [(b"authorization", b"Bearer")]):
        assert {send(harness, None, headers=headers).status for _ in range(20)} == {401}
    for malformed in (b"Bearer a b", b"Bearer\tx", b'Bearer "x"'):
        assert {send(harness, None, headers=[(b"authorization", malformed)]).status for _ in range(20)} == {400}
    assert spray(harness, 3) == [401, 401, 401]  # still the whole budget
    assert send(harness, next(iter(GUESSES[100:]))).status == 429
    assert send(harness, None).status == 401  # and still answered as before: not a 429


def test_only_refused_tokens_count_not_a_scope_refusal_an_outage_or_a_crash() -> None:
    """A 403, a 503 or a 500 says nothing about whether the token was guessed."""
    harness = throttled(required_scopes=["write"])
    outcomes = [send(harness, token).status for token in [ALICE_1, DOWN, CRASH] * 10]
    assert outcomes == [403, 503, 500] * 10
    assert send(harness, BOB).status == 200
    # A token over max_token_length is a refused token: sending long ones is no way round the count.
    harness = throttled(max_token_length=16)
    assert [send(harness, "x" * 17 + str(n)).status for n in range(3)] == [401, 401, 401]
    assert_too_many(send(harness, "sk-short-guess"))


def test_a_token_accepted_within_the_window_is_never_throttled() -> None:
    """The valid user behind the same NAT as the guesser keeps working; the guesser does not."""
    harness = throttled()
    assert send(harness, BOB).status == 200
    assert send(harness, ALICE_1, NEIGHBOUR).status == 200  # accepted from elsewhere: the token, not the address
    assert spray(harness, 3) == [401, 401, 401]
    for _ in range(5):
        outcome = send(harness, BOB)
        assert (outcome.status, outcome.provider_calls) == (200, [BOB])
    assert send(harness, ALICE_1).status == 200
    assert_too_many(send(harness, GUESSES[50]))
    assert_too_many(send(harness, ALICE_2))  # valid, never accepted
    assert len([c for c in harness.provider.calls if c in GUESSES]) == 3  # type: ignore[attr-defined]


@pytest.mark.slow
def test_an_acceptance_older_than_the_window_no_longer_exempts() -> None:
    harness = throttled(window=2.0)
    assert send(harness, BOB).status == 200
    time.sleep(2.2)
    assert spray(harness, 3) == [401, 401, 401]
    assert_too_many(send(harness, BOB), window=2.0)


@pytest.mark.slow
def test_the_throttle_lifts_once_the_window_has_passed_and_is_a_sliding_window() -> None:
    harness = throttled(window=1.0)
    assert spray(harness, 3) == [401, 401, 401]
    assert_too_many(send(harness, BOB), window=1.0)
    deadline = time.monotonic() + 10
    while (outcome := send(harness, BOB)).status == 429 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (outcome.status, outcome.provider_calls) == (200, [BOB])
    # Refusals further apart than the window never add up.
    harness = throttled(window=2.0)
    tokens = guesses()
    assert spray(harness, 2, tokens=tokens) == [401, 401]
    time.sleep(2.4)
    assert spray(harness, 2, tokens=tokens) == [401, 401]
    assert spray(harness, 1, tokens=tokens) == [401]  # three in the last two seconds: now the limit
    assert send(harness, next(tokens)).status == 429


async def call(middleware: BearerAuthMiddleware, token: str, address: str) -> int:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send_message(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "method": "POST", "path": "/mcp", "headers": bearer(token)}
    await middleware({**scope, "client": (address, 1), "root_path": "", "query_string": b""}, receive, send_message)
    return int(sent[0]["status"])


@pytest.mark.slow
def test_the_throttle_remembers_at_most_10000_addresses_and_forgets_the_oldest_first() -> None:
    """Bounded memory: a guesser with an address per request (IPv6) cannot grow the tables without end."""
    provider = FakeProvider(otherwise=AccessToken("", {"sub": "anyone"}))
    provider.answers = dict.fromkeys(GUESSES)  # these are refused, every other token accepted
    middleware = BearerAuthMiddleware(lambda s, r, w: _ok(w), provider, max_failures=3)

    async def scenario() -> None:
        for token in GUESSES[:3]:
            assert await call(middleware, token, ATTACKER) == 401
        assert await call(middleware, GUESSES[3], ATTACKER) == 429
        for n in range(9_999):  # one refusal each from 9,999 other addresses: 10,000 remembered in all
            assert await call(middleware, GUESSES[n % 100 + 100], f"2001:db8::{n:x}") == 401
        assert await call(middleware, GUESSES[3], ATTACKER) == 429
        assert await call(middleware, GUESSES[4], "2001:db8::ffff:1") == 401  # the 10,001st: the oldest goes
        assert await call(middleware, GUESSES[5], ATTACKER) == 401
        for n in range(10_001):  # accepted tokens are remembered within the same bound
            assert await call(middleware, f"sk-accepted-{n}", ATTACKER) == 200

    anyio.run(scenario)
    throttle = middleware._throttle
    assert throttle is not None
    assert len(throttle._failures) == 10_000 and len(throttle._accepted) == 10_000


async def _ok(send_message: Any) -> None:
    await send_message({"type": "http.response.start", "status": 200, "headers": []})
    await send_message({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_failures": 0}, ValueError, "max_failures must be a positive int, not 0"),
        ({"max_failures": -1}, ValueError, "max_failures must be a positive int"),
        ({"max_failures": True}, TypeError, "max_failures must be a positive int, not bool"),
        ({"max_failures": 2.5}, TypeError, "max_failures must be a positive int, not float"),
        ({"max_failures": "3"}, TypeError, "max_failures must be a positive int, not str"),
        ({"max_failures": 3, "failure_window": 0}, ValueError, "failure_window must be a finite number of seconds"),
        ({"max_failures": 3, "failure_window": -1}, ValueError, "failure_window must be a finite number of seconds"),
        ({"max_failures": 3, "failure_window": math.inf}, ValueError, "failure_window must be a finite number"),
        ({"max_failures": 3, "failure_window": math.nan}, ValueError, "failure_window must be a finite number"),
        ({"max_failures": 3, "failure_window": "60"}, TypeError, "failure_window must be a number of seconds"),
    ],
)
def test_throttle_options_are_checked(options: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(")):
        BearerAuthMiddleware(lambda s, r, w: _ok(w), FakeProvider(), **options)


# --- where the count could be dodged ------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), DISCOVERY)
def test_a_guess_at_an_oauth_discovery_path_counts_like_any_other(method: str, path: str) -> None:
    """Without resource= these paths answer 404 (no OAuth here); a token sent there is still verified,
    so a guesser spraying /register must use up the same budget, and the trail must say why each failed."""
    harness = throttled(audit=True)
    with mcp_bearer_log() as records:
        assert [send(harness, token, method=method, path=path).status for token in GUESSES[:3]] == [404] * 3
        assert_too_many(send(harness, GUESSES[3], method=method, path=path))
        assert_too_many(send(harness, GUESSES[4]))
    reasons = [vars(r)["mcp_bearer"]["reason"] for r in records if r.name == "mcp_bearer.audit"]
    assert reasons == ["unknown API key"] * 3 + [None, None]


def test_a_throttled_request_is_audited_and_says_no_reason() -> None:
    """The provider was not asked, so there is no verdict to explain: no DEBUG record, no reason."""
    harness = throttled(audit=True)
    spray(harness, 3)
    with mcp_bearer_log() as records:
        assert_too_many(send(harness, GUESSES[10]))
    assert [r.msg for r in records if r.name == "mcp_bearer"] == []
    (record,) = [r for r in records if r.name == "mcp_bearer.audit"]
    fields = vars(record)["mcp_bearer"]
    assert (fields["outcome"], fields["status"], fields["reason"]) == ("429 too_many_requests", 429, None)
    assert fields["client"] == f"{ATTACKER}:40000" and record.levelno == logging.INFO


# --- end to end: a real server, the SDK's clients --------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("root_path", ["", "/api"])
async def test_e2e_a_guesser_is_throttled_while_the_user_behind_the_same_address_goes_on(root_path: str) -> None:
    """Every client here is 127.0.0.1: the guesser and the user share an address, as behind a NAT."""
    provider = FakeProvider()
    app = BearerAuthMiddleware(mcp_app(whoami), provider, max_failures=3)
    with serve(app, root_path=root_path) as base:
        async with mcp_session(base + "/mcp", BOB) as (session, _):
            assert (await call_json(session, "whoami"))["token"] == fingerprint(BOB)

            def guess(token: str) -> tuple[int, dict[str, str], bytes]:
                return raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {token}"})

            for token in GUESSES[:3]:
                assert (await anyio.to_thread.run_sync(guess, token))[0] == 401
            status, headers, body = await anyio.to_thread.run_sync(guess, GUESSES[3])
            assert (status, json.loads(body)) == (429, TOO_MANY) and 1 <= int(headers["retry-after"]) <= 60
            assert await anyio.to_thread.run_sync(lambda: post_initialize(base, ALICE_1)) == 429
            for _ in range(3):  # the user's session goes on, and so do new connections with the same key
                assert (await call_json(session, "whoami"))["token"] == fingerprint(BOB)
            seen = await whoami_on_both_generations(base + "/mcp", BOB)
            assert len(seen) == (2 if MCP_MAJOR == 2 else 1) and {s["token"] for s in seen} == {fingerprint(BOB)}
    assert [c for c in provider.calls if c in GUESSES] == GUESSES[:3] and ALICE_1 not in provider.calls


@pytest.mark.slow
def test_cli_max_failures_throttles_guessing(tmp_path: Path) -> None:
    tokens = tokens_file(tmp_path, {BOB: {"sub": "bob"}})
    with served(user_module(tmp_path), "--tokens-file", tokens, "--max-failures", "3", cwd=tmp_path) as server:
        assert server.banner()[-1] == "  throttle: 429 after 3 refused tokens per address per minute"
        assert post_initialize(server.base, BOB) == 200
        assert [post_initialize(server.base, token) for token in GUESSES[:4]] == [401, 401, 401, 429]
        status, headers, _ = raw_request(server.base, "POST", "/mcp", {"Authorization": f"Bearer {GUESSES[5]}"})
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 60
        assert post_initialize(server.base, BOB) == 200
        assert post_initialize(server.base, None) == 401
