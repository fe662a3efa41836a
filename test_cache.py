"""CachedProvider, driven directly where time and concurrency can be steered: what goes wrong in
caches is a verdict outliving its token, a stampede on the token service, a shared claims dict, a
raw token left in memory."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest

import mcp_bearer
from mcp_bearer import (
    AccessToken,
    BearerAuthMiddleware,
    CachedProvider,
    ProviderUnavailable,
)
from support import (
    ACTIVE,
    SECRETS,
    T1,
    T2,
    T3,
    T4,
    T5,
    FakeProvider,
    Harness,
    IntrospectionEndpoint,
    SyncProvider,
    bearer,
    claims_echo,
    introspector,
    raw_request,
    serve,
    verdict,
    verify,
)

# CachedProvider's insides are private to mcp_bearer: the tests reach them through these only.
WRAPPED = "_verify"  # the attribute that holds the wrapped provider


def kept_entries(cache: CachedProvider) -> dict[bytes, Any]:
    """The verdicts the cache keeps, by SHA-256 digest of the token: a "yes" (deadline, its verdict) or a "no"
    (its deadline)."""
    return {**cache._entries, **cache._refused}


def verdicts_in_flight(cache: CachedProvider) -> dict[bytes, Any]:
    """The verdicts being fetched, one per token digest."""
    return cache._flights


def keep_probe(cache: CachedProvider, claims: dict[str, Any]) -> None:
    """Put a verdict with these claims in the cache, the way the cache keeps one."""
    cache._entries[b"probe"] = (0.0, mcp_bearer._Verdict(mcp_bearer._Claims(claims), (), None, None))


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


# --- a verdict lives no longer than its TTL, nor than its token -------------------------


def test_cache_remembers_a_verdict_for_ttl_then_asks_again() -> None:
    provider = FakeProvider({T1: verdict()})
    cache = CachedProvider(provider, ttl=0.2)
    first, second = verify(cache, T1), verify(cache, T1)
    assert first is not None and second is not None and provider.calls == [T1]
    assert second.token == T1 and second.claims == {"sub": "dana", "groups": ["ops", "dev"]}
    assert second.scopes == ["read"] and second.expires_at == first.expires_at
    time.sleep(0.25)
    assert verify(cache, T1) is not None and provider.calls == [T1, T1]


@pytest.mark.parametrize(
    ("expires_in", "kept_for"),
    [(0.2, 0.2), (-1.0, 0.0), (math.nan, 0.0), (None, 300.0)],
    ids=["expires-before-ttl", "already-expired", "nan", "no-expiry"],
)
def test_cache_never_outlives_the_tokens_own_expiry(expires_in: float | None, kept_for: float) -> None:
    provider = FakeProvider({T1: verdict(expires_in=expires_in)})
    cache = CachedProvider(provider, ttl=300)
    verify(cache, T1)
    verify(cache, T1)
    assert len(provider.calls) == (1 if kept_for else 2)
    time.sleep(0.25)
    verify(cache, T1)
    assert len(provider.calls) == (2 if kept_for == 0.2 else 1 if kept_for else 3)


@pytest.mark.parametrize("negative_ttl", [0.0, 0.2])
def test_cache_remembers_no_only_with_a_negative_ttl(negative_ttl: float) -> None:
    """A bad token repeated by a client (or an attacker) hits the token service once per negative_ttl."""
    provider = FakeProvider()
    cache = CachedProvider(provider, negative_ttl=negative_ttl)
    assert verify(cache, T1) is None and verify(cache, T1) is None
    assert len(provider.calls) == (1 if negative_ttl else 2)
    time.sleep(0.25)
    assert verify(cache, T1) is None and len(provider.calls) == (2 if negative_ttl else 3)


def test_cache_is_bounded_and_forgets_the_oldest_first() -> None:
    provider = FakeProvider(dict.fromkeys((T1, T2, T3, T4, T5), verdict()))
    cache = CachedProvider(provider, max_entries=3)
    for token in (T1, T2, T3, T4, T5):
        verify(cache, token)
    assert len(kept_entries(cache)) == 3
    for token in (T5, T4, T3):
        verify(cache, token)
    assert provider.calls == [T1, T2, T3, T4, T5]  # the newest three were kept
    verify(cache, T1)
    assert provider.calls[-1] == T1 and len(kept_entries(cache)) == 3


def test_cache_invalidate_and_clear_forget_even_a_verdict_in_flight() -> None:
    """Revocation: after invalidate(token) the token service is asked again, even if it was being asked."""
    provider = FakeProvider({T1: verdict(), T2: verdict()})
    cache = CachedProvider(provider)
    verify(cache, T1), verify(cache, T2)
    cache.invalidate(T1)
    verify(cache, T1), verify(cache, T2)
    assert provider.calls == [T1, T2, T1]
    cache.clear()
    verify(cache, T1), verify(cache, T2)
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
    provider = FakeProvider({T1: failure}, delay=0.05)
    cache = CachedProvider(provider, negative_ttl=60)
    results = anyio.run(together, 10, lambda: cache.verify_token(T1))
    assert provider.calls == [T1] and all(isinstance(r, type(failure)) for r in results)
    with pytest.raises(type(failure)):
        verify(cache, T1)
    assert provider.calls == [T1, T1]  # not kept: the next request asks again
    provider.answers[T1] = verdict()  # the service recovers
    assert verify(cache, T1) is not None and verify(cache, T1) is not None and len(provider.calls) == 3
    harness = Harness(CachedProvider(FakeProvider({T1: failure})))
    assert harness.request(bearer(T1)).status == (503 if isinstance(failure, ProviderUnavailable) else 500)


# --- stampedes and shared state: one call for a burst, one copy per request -------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("answer", [verdict(), None], ids=["access-token", "none"])
def test_cache_single_flight_100_concurrent_first_requests_make_1_call(backend: str, answer: Any) -> None:
    """No stampede: a burst of new requests with one token costs the token service one call."""
    provider = FakeProvider({T1: answer}, delay=0.05)
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
    cache = CachedProvider(FakeProvider({T1: verdict()}, delay=0.05))

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


def test_cache_a_cancelled_first_request_leaves_the_others_to_ask_for_themselves() -> None:
    """A client that hangs up mid-verification must not leave the requests waiting on it stuck."""
    provider = FakeProvider({T1: verdict()}, delay=0.2)
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


# --- no raw token in memory -------------------------------------------------------------


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
        elif (slots := getattr(type(value), "__slots__", None)) is not None and not isinstance(
            value, (str, bytes, int, float)
        ):
            stack.extend(getattr(value, name) for name in slots if hasattr(value, name))


def assert_holds_no_token(cache: CachedProvider, tokens: list[str]) -> None:
    data = {name: value for name, value in vars(cache).items() if name != WRAPPED}  # not the wrapped provider
    values = list(held(data))
    for token in tokens:
        assert not [v for v in values if isinstance(v, str) and token in v], "a raw token in the cache"
        assert not [v for v in values if isinstance(v, (bytes, bytearray)) and token.encode() in v], "token bytes"


def test_cache_holds_no_raw_token_in_memory() -> None:
    """A heap dump or a debugger on the cache must not yield tokens: keys are SHA-256 digests."""
    tokens = [T1, T2, T3, T4]
    provider = FakeProvider({T1: verdict(), T2: verdict(note="x"), T4: verdict()}, delay=0.05)
    cache = CachedProvider(provider, negative_ttl=60)

    async def scenario() -> None:
        async with anyio.create_task_group() as group:
            for token in tokens:
                group.start_soon(cache.verify_token, token)
            await anyio.sleep(0.02)
            assert len(verdicts_in_flight(cache)) == 4
            assert_holds_no_token(cache, tokens)  # while the verdicts are being fetched

    anyio.run(scenario)
    assert set(kept_entries(cache)) == {hashlib.sha256(t.encode()).digest() for t in tokens}  # T3: a kept "no"
    assert_holds_no_token(cache, tokens)
    assert not [s for s in SECRETS if s in repr(cache)]
    # The walk would see a token if one were kept: the check can fail.
    keep_probe(cache, {"sub": "x", "roles": [{"token": T1}]})
    with pytest.raises(AssertionError, match="raw token"):
        assert_holds_no_token(cache, tokens)


# --- configuration CachedProvider refuses -----------------------------------------------


@pytest.mark.parametrize(
    ("provider", "options", "error", "match"),
    [
        (SyncProvider(), {}, TypeError, "must be an async method"),
        (object(), {}, TypeError, "must be an async method"),
        (FakeProvider(), {"ttl": 0}, ValueError, "ttl"),
        (FakeProvider(), {"ttl": -1}, ValueError, "ttl"),
        (FakeProvider(), {"ttl": math.inf}, ValueError, "ttl"),
        (FakeProvider(), {"ttl": math.nan}, ValueError, "ttl"),
        (FakeProvider(), {"ttl": "300"}, TypeError, "ttl"),
        (FakeProvider(), {"negative_ttl": -1}, ValueError, "negative_ttl"),
        (FakeProvider(), {"negative_ttl": math.nan}, ValueError, "negative_ttl"),
        (FakeProvider(), {"negative_ttl": None}, TypeError, "negative_ttl"),
        (FakeProvider(), {"max_entries": 0}, ValueError, "max_entries"),
        (FakeProvider(), {"max_entries": 2.5}, TypeError, "max_entries"),
        (FakeProvider(), {"max_entries": True}, TypeError, "max_entries"),
    ],
)
def test_cache_refuses_a_bad_configuration(
    provider: Any, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        CachedProvider(provider, **options)
    CachedProvider(FakeProvider(), ttl=0.001, negative_ttl=0, max_entries=1)  # the smallest allowed


# --- end to end: cached introspection under a real server -------------------------------


@pytest.mark.slow
def test_e2e_cached_introspection_asks_once_for_20_concurrent_requests_and_forgets_a_revoked_token(
    introspection: IntrospectionEndpoint,
) -> None:
    introspection.mode = "slow"  # 5 ms per answer: the 20 requests overlap it
    cache = CachedProvider(introspector(introspection))
    headers = {"Authorization": f"Bearer {ACTIVE}"}
    with serve(BearerAuthMiddleware(claims_echo, cache)) as base:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: raw_request(base, "GET", "/mcp", headers), range(20)))
        assert [(status, json.loads(body)["sub"]) for status, _, body in answers] == [(200, "dana")] * 20
        assert len(introspection.introspections) == 1
        del introspection.answers[ACTIVE]  # revoked at the authorization server
        assert raw_request(base, "GET", "/mcp", headers)[0] == 200  # still cached: revocation needs invalidate
        cache.invalidate(ACTIVE)
        assert raw_request(base, "GET", "/mcp", headers)[0] == 401
    assert len(introspection.introspections) == 2
