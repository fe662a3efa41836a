"""Many replicas, one truth: RedisStore against a real redis-server on loopback, shared by two or three
replicas (uvicorn or hypercorn servers in threads, each with its own CachedProvider and RedisStore, or
the command line in subprocesses) in front of one RFC 7662 introspection endpoint.

What goes wrong with shared state: a stampede on the token service, an invalidation or a revocation
that does not reach every replica, a cached verdict that skips the deny list, a throttle each replica
counts on its own, an outage that fails open or hangs, a counter that repeats itself after a restart,
a token or a password written where anyone with Redis access, or the logs, can read it.

Waits are bounded and generous (a shared 2-core VM); the latencies the rules promise (1 s for an
invalidation, 2 s for a revocation) are printed, so that ``-s`` shows them.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mcp_bearer import (
    AccessToken,
    BearerAuthMiddleware,
    BearerAuthProvider,
    CachedProvider,
    JWTProvider,
    ProviderChain,
    RedisStore,
    RevocationCheck,
    StaticTokenProvider,
    new_api_key,
)
from support import (
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    GENERATIONS,
    HANDSHAKE,
    ISSUER,
    REPO,
    SECRETS,
    TOKENS,
    IntrospectionEndpoint,
    answer_lifespan,
    claims_echo,
    free_port,
    httpx,
    introspector,
    mcp_app,
    mcp_bearer_log,
    opaque,
    private_key,
    raw_request,
    record_text,
    sdk_client,
    serve,
    serve_with,
    sign,
    tool_text,
    whoami,
)

# CI installs both and sets MCP_BEARER_TESTS_NEED_EVERYTHING, so there a missing part fails instead of skipping.
if os.environ.get("MCP_BEARER_TESTS_NEED_EVERYTHING") and shutil.which("redis-server") is None:
    raise RuntimeError("the replica tests need redis-server on PATH (Debian: apt-get install redis-server)")
redis = pytest.importorskip("redis")
if shutil.which("redis-server") is None:
    pytest.skip("these tests start a real redis-server, which is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow

AS_ISSUER = "https://as.example.com/"  # the introspected tokens' iss: the deny list names users by (iss, sub)
API_KEYS = "mcp_bearer:api-key"  # the issuer API keys are revoked under, as the README names it
# Every character a URL parser could split on, between fragments a log or a message could keep one of.
PASSWORD = "Qx7Lm2:Vb9Tn4@Ws1Jd8/Pz3Kr5?Hy6Nc0#Gf2Ue7%Bo5Ai3"
FRAGMENTS = re.split(r"[:@/?#%]", PASSWORD)
SECRETS.update({PASSWORD, quote(PASSWORD, safe=""), *FRAGMENTS})
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "mcp-bearer")
WAIT = 10.0  # seconds any one wait may take before the test fails, far above the promised latencies
LEGACY = HANDSHAKE


# --- a redis-server of each test's own ------------------------------------------------------------


class RedisServer:
    """A real redis-server on a free loopback port, nothing persisted; it can be stopped, frozen (SIGSTOP:
    connections are accepted by the kernel, and nothing answers) and started again on the same port."""

    def __init__(self, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.directory = tempfile.mkdtemp(prefix="mcp_bearer-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    @property
    def url(self) -> str:
        userinfo = "" if self.password is None else f":{quote(self.password, safe='')}@"  # as RFC 3986 3.2.1 asks
        return f"redis://{userinfo}127.0.0.1:{self.port}/0"

    def client(self, password: str | None = None) -> Any:
        return redis.Redis(host="127.0.0.1", port=self.port, password=password or self.password, socket_timeout=5)

    def start(self, *, requirepass: str | None = None) -> None:
        """Start (again, on the same port); ``requirepass``: this time with a password."""
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", self.directory, "--loglevel", "warning"]
        password = requirepass or self.password
        if password is not None:
            command += ["--requirepass", password]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                self.client(password).ping()
                return
            except redis.exceptions.ConnectionError:
                assert self.process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.frozen:
            self.thaw()
        self.process.terminate()
        try:
            self.process.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(WAIT)
        self.process = None

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.frozen = False

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def contents(self) -> str:
        """Every key and every value in every database, as text: strings, hashes, sets, sorted sets, lists."""
        client, seen = self.client(), []
        for number in range(16):
            client.execute_command("SELECT", number)
            for key in client.scan_iter(count=1000):
                kind = client.type(key).decode()
                value: Any = {
                    "string": lambda k: client.get(k),
                    "hash": lambda k: client.hgetall(k),
                    "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
                    "set": lambda k: client.smembers(k),
                    "list": lambda k: client.lrange(k, 0, -1),
                }[kind](key)
                seen.append(f"{number} {key!r} {kind} {value!r}")
        return "\n".join(seen)

    def calls(self, command: str) -> int:
        """How many times this command has run since the server started (INFO commandstats)."""
        stats = self.client().info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@contextlib.contextmanager
def redis_server(password: str | None = None) -> Iterator[RedisServer]:
    server = RedisServer(password)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_db(shared_redis: RedisServer) -> RedisServer:
    """The module's redis-server, emptied as each test starts."""
    shared_redis.client().flushall()
    return shared_redis


# --- tokens, replicas and requests ------------------------------------------------------------------


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """The caller's claims as JSON; lifespan answered (hypercorn's trio worker stops on an app that ignores it)."""
    if scope["type"] == "lifespan":
        return await answer_lifespan(receive, send)
    await claims_echo(scope, receive, send)


def grant(endpoint: IntrospectionEndpoint, name: str, **claims: Any) -> str:
    """A new opaque token the endpoint says is active, with a jti and an iat, as authorization servers issue."""
    token = opaque(f"replica-{name}-{time.monotonic_ns()}")
    now = int(time.time())
    endpoint.answers[token] = {
        "active": True,
        "iss": AS_ISSUER,
        "sub": "dana",
        "jti": f"jti-{name}",
        "iat": now - 10,
        "exp": now + 3600,
        "scope": "read",
        **claims,
    }
    return token


def asked(endpoint: IntrospectionEndpoint, token: str | None = None) -> int:
    """Introspections the endpoint answered (for one token, if given)."""
    return sum(token is None or r.form.get("token") == [token] for r in endpoint.introspections)


def get(base: str, token: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    return raw_request(base, "GET", path, {"Authorization": f"Bearer {token}"})


def status(base: str, token: str) -> int:
    return get(base, token)[0]


def seconds_until(condition: Callable[[], bool], limit: float = WAIT) -> float:
    """How long until ``condition`` held, checked every 20 ms; the test fails past ``limit``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < limit, f"not so within {limit} s"
        time.sleep(0.02)
    return time.monotonic() - start


@dataclass
class Replica:
    base: str
    store: RedisStore
    cache: CachedProvider | None


@contextlib.contextmanager
def replicas(
    count: int,
    url: str,
    provider: Callable[[], BearerAuthProvider],
    *,
    ttl: float | None = 60.0,
    app: Any = echo,
    servers: Sequence[str] = ("uvicorn",),
    store_options: dict[str, Any] | None = None,
    **middleware: Any,
) -> Iterator[list[Replica]]:
    """``count`` replicas, each its own server with its own provider, CachedProvider (or RevocationCheck, for
    ``ttl=None``) and RedisStore on ``url``; ``servers`` cycles over the servers they run under."""
    with contextlib.ExitStack() as stack:
        built: list[Replica] = []
        for n in range(count):
            store = RedisStore(url, **(store_options or {}))
            stack.callback(store.close)  # after its server has stopped: callbacks run last in, first out
            cache = None if ttl is None else CachedProvider(provider(), ttl=ttl, store=store)
            guard = BearerAuthMiddleware(app, cache or RevocationCheck(provider(), store), store=store, **middleware)
            base = stack.enter_context(serve_with(servers[n % len(servers)], guard))
            built.append(Replica(base, store, cache))
        yield built


@contextlib.contextmanager
def cli_replicas(count: int, *args: str, env: dict[str, str]) -> Iterator[list[tuple[str, list[str], list[str]]]]:
    """``mcp-bearer support:claims_echo --port 0 ARGS`` ``count`` times: (base URL, banner, stderr lines) each;
    stderr is read once they have stopped."""
    with contextlib.ExitStack() as stack:
        started: list[tuple[str, list[str], list[str]]] = []
        for _ in range(count):
            errors = stack.enter_context(tempfile.TemporaryFile(mode="w+"))
            process = subprocess.Popen(
                [CONSOLE_SCRIPT, "support:claims_echo", "--port", "0", *args],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": REPO, **env},
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
            banner: list[str] = []
            stderr_lines: list[str] = []

            def stop(
                process: subprocess.Popen[str] = process, errors: Any = errors, lines: list[str] = stderr_lines
            ) -> None:
                process.terminate()
                process.wait(20)
                errors.seek(0)
                lines.extend(errors.read().splitlines())

            stack.callback(stop)
            assert process.stdout is not None
            for line in process.stdout:  # the banner: "Serving URL ...", what it serves, "  public paths: ..."
                banner.append(line.rstrip("\n"))
                if line.startswith("  public paths:"):
                    break
            else:
                errors.seek(0)
                pytest.fail(f"mcp-bearer exited with {process.wait()}: {errors.read()}")
            (serving,) = [line for line in banner if line.startswith("Serving ")]
            started.append((serving.split()[1].removesuffix("/mcp"), banner, stderr_lines))
        yield started


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "MCP_BEARER_REDIS_URL"}
    return subprocess.run(
        [CONSOLE_SCRIPT, *args],
        cwd=REPO,
        env={**environment, "PYTHONPATH": REPO, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def store_warnings(records: list[Any]) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith("Redis store ") and "unreachable" in r.msg]


def store_recoveries(records: list[Any]) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith("Redis store ") and "again" in r.msg]


# --- verdicts shared: one introspection per TTL for all replicas -----------------------------------


def test_one_token_over_three_replicas_costs_one_introspection_per_ttl(
    redis_db: RedisServer, introspection: IntrospectionEndpoint
) -> None:
    token, ttl = grant(introspection, "round-robin"), 4.0
    with replicas(3, redis_db.url, lambda: introspector(introspection), ttl=ttl) as group:
        for period in (1, 2):
            start = time.monotonic()
            answers = [get(group[n % 3].base, token) for n in range(15)]
            assert time.monotonic() - start < ttl, "the requests took longer than the TTL: nothing to conclude"
            assert {a[0] for a in answers} == {200}
            assert len({a[2] for a in answers}) == 1  # every replica saw the same claims
            assert json.loads(answers[0][2])["sub"] == "dana"
            assert asked(introspection, token) == period
            time.sleep(ttl - (time.monotonic() - start) + 0.3)  # past the TTL: the next period asks once more


def test_concurrent_first_requests_cost_at_most_one_introspection_per_replica(
    redis_db: RedisServer, introspection: IntrospectionEndpoint
) -> None:
    """The documented bound: single flight within a replica, none across them (no lock in Redis)."""
    token, per_replica = grant(introspection, "stampede"), 6
    introspection.mode = "hang"  # every first request is in flight at once: the worst case
    with replicas(3, redis_db.url, lambda: introspector(introspection)) as group:
        results: list[int] = []

        def one(base: str) -> None:
            results.append(status(base, token))

        threads = [threading.Thread(target=one, args=(r.base,)) for r in group for _ in range(per_replica)]
        for thread in threads:
            thread.start()
        seconds_until(lambda: asked(introspection) >= 1)
        time.sleep(1.0)  # let every request that is going to reach the endpoint get there
        introspection.release.set()
        for thread in threads:
            thread.join(WAIT)
        calls = asked(introspection, token)
        print(f"\n{len(threads)} concurrent first requests on 3 replicas cost {calls} introspections")
        assert results == [200] * len(threads)
        assert 1 <= calls <= len(group)
        assert [status(r.base, token) for r in group] == [200] * 3 and asked(introspection, token) == calls


def test_a_warm_replica_answers_from_its_own_cache_without_a_round_trip_to_redis(
    redis_db: RedisServer, introspection: IntrospectionEndpoint
) -> None:
    """The local cache is in front: once warm, a replica reads no verdict from Redis, also for a token
    invalidated a while ago and fetched again (an invalidation is applied once, not at every poll)."""
    token, invalidated = grant(introspection, "warm"), grant(introspection, "invalidated-once")
    with replicas(2, redis_db.url, lambda: introspector(introspection)) as (a, b):
        assert [status(r.base, t) for r in (a, b) for t in (token, invalidated)] == [200] * 4
        assert a.cache is not None
        a.cache.invalidate(invalidated)
        time.sleep(1.5)  # every replica has applied it
        assert status(a.base, invalidated) == status(b.base, invalidated) == 200  # warm again
        assert asked(introspection, invalidated) == 2
        before = redis_db.calls("get")
        for n in range(12):
            assert status((a, b)[n % 2].base, (token, invalidated)[n // 2 % 2]) == 200
            time.sleep(0.25)  # six polls of the store in all
        assert redis_db.calls("get") == before
        assert asked(introspection, token) == 1 and asked(introspection, invalidated) == 2


def test_shared_verdicts_are_claims_under_a_digest_and_never_outlive_the_token(
    redis_db: RedisServer, introspection: IntrospectionEndpoint
) -> None:
    short = grant(introspection, "short-lived", exp=int(time.time()) + 3)
    with replicas(2, redis_db.url, lambda: introspector(introspection), ttl=60) as (a, b):
        assert status(a.base, short) == 200
        client = redis_db.client()
        (key,) = client.keys("mcp_bearer:verdict:*")
        assert key.decode().rsplit(":", 1)[1] == hashlib.sha256(short.encode()).hexdigest()
        record = json.loads(client.get(key))
        assert record["claims"] == introspection.answers[short] and record["scopes"] == ["read"]
        assert record["expires_at"] == introspection.answers[short]["exp"]
        assert 0 < client.pttl(key) <= 3000  # the token's own expiry caps the TTL of 60 s
        assert status(b.base, short) == 200 and asked(introspection, short) == 1  # b read a's verdict
        seconds_until(lambda: time.time() > introspection.answers[short]["exp"] + 0.2)
        del introspection.answers[short]  # as the endpoint answers for an expired token
        assert status(b.base, short) == status(a.base, short) == 401


# --- invalidate and clear reach every replica ----------------------------------------------------


def test_invalidate_on_one_replica_makes_another_ask_again_within_a_second(
    redis_db: RedisServer, introspection: IntrospectionEndpoint
) -> None:
    token = grant(introspection, "invalidated")
    with replicas(2, redis_db.url, lambda: introspector(introspection)) as (a, b):
        assert status(a.base, token) == status(b.base, token) == 200 and asked(introspection, token) == 1
        assert a.cache is not None
        a.cache.invalidate(token)
        elapsed = seconds_until(lambda: status(b.base, token) == 200 and asked(introspection, token) == 2)
        print(f"\ninvalidate on A: B asked again after {elapsed:.2f} s")
        assert elapsed < 2.0  # 1 s promised; a second more for a busy machine
        assert [status(r.base, token) for r in (a, b, a, b)] == [200] * 4 and asked(introspection, token) == 2


@pytest.mark.parametrize("how", ["invalidate", "clear"])
def test_a_token_the_endpoint_now_calls_inactive_is_refused_by_every_replica_after_invalidate_or_clear(
    redis_db: RedisServer, introspection: IntrospectionEndpoint, how: str
) -> None:
    token, bystander = grant(introspection, "withdrawn"), grant(introspection, "bystander")
    with replicas(3, redis_db.url, lambda: introspector(introspection)) as group:
        for replica in group:
            assert status(replica.base, token) == status(replica.base, bystander) == 200
        del introspection.answers[token]  # withdrawn at the authorization server: {"active": false}
        cache = group[0].cache
        assert cache is not None
        cache.invalidate(token) if how == "invalidate" else cache.clear()
        elapsed = seconds_until(lambda: [status(r.base, token) for r in group[1:]] == [401, 401])
        print(f"\n{how} on A: B and C refuse after {elapsed:.2f} s")
        assert elapsed < 2.0
        assert status(group[0].base, token) == 401
        assert [status(r.base, bystander) for r in group] == [200] * 3
        assert asked(introspection, bystander) == (1 if how == "invalidate" else 2)  # clear forgets it too


# --- the deny list: revoked on every replica within 2 s, even from a warm cache --------------------


def test_a_jti_revoked_through_the_command_line_is_refused_by_every_cli_replica_from_a_warm_cache(
    redis_db: RedisServer, introspection: IntrospectionEndpoint
) -> None:
    first, second, kept = (grant(introspection, name) for name in ("cli-1", "cli-2", "cli-kept"))
    serving = ["--introspection-url", introspection.url, "--client-id", CLIENT_ID, "--cache-ttl", "60"]
    env = {"MCP_BEARER_CLIENT_SECRET": CLIENT_SECRET, "MCP_BEARER_REDIS_URL": redis_db.url}
    with cli_replicas(2, *serving, env=env) as started:
        bases = [base for base, _, _ in started]
        for _, banner, _ in started:
            assert any("shared through RedisStore" in line for line in banner), banner
        for token in (first, second, kept):
            assert [status(base, token) for base in bases] == [200, 200] and asked(introspection, token) == 1
        until = str(introspection.answers[first]["exp"])
        # Through the environment, then through --redis-url: the two ways an operator names the store.
        by_env = run_cli("revoke", "--jti", "jti-cli-1", "--until", until, env={"MCP_BEARER_REDIS_URL": redis_db.url})
        assert by_env.returncode == 0, by_env.stderr
        assert "every replica refuses it" in by_env.stdout
        elapsed = seconds_until(lambda: [status(base, first) for base in bases] == [401, 401])
        by_flag = run_cli("revoke", "--jti", "jti-cli-2", "--until", until, "--redis-url", redis_db.url)
        assert by_flag.returncode == 0, by_flag.stderr
        elapsed2 = seconds_until(lambda: [status(base, second) for base in bases] == [401, 401])
        print(f"\nrevoke --jti: refused on both CLI replicas after {elapsed:.2f} s and {elapsed2:.2f} s")
        assert max(elapsed, elapsed2) < 3.0  # 2 s promised, plus a second for a busy machine
        assert [status(base, kept) for base in bases] == [200, 200]
        assert [asked(introspection, t) for t in (first, second, kept)] == [1, 1, 1]  # refused from the cache
    assert run_cli("revoke", "--jti", "x", "--until", until).returncode == 2  # no store named: nothing written


def test_revoke_subject_signs_a_user_out_of_every_replica_and_lets_a_later_token_in(
    redis_db: RedisServer, introspection: IntrospectionEndpoint
) -> None:
    instant = int(time.time())
    old = grant(introspection, "old", sub="erin", iat=instant - 60)
    older = grant(introspection, "older", sub="erin", iat=instant - 3600, jti="jti-older")
    later = grant(introspection, "later", sub="erin", iat=instant)  # issued at the instant: not before it
    other_user = grant(introspection, "frank", sub="frank", iat=instant - 60)
    other_issuer = grant(introspection, "erin-elsewhere", sub="erin", iss="https://other-as.example.com/")
    no_iat = grant(introspection, "no-iat", sub="erin", iat=None)  # cannot show it was issued after
    tokens = [old, older, later, other_user, other_issuer, no_iat]
    with replicas(3, redis_db.url, lambda: introspector(introspection)) as group:
        for token in tokens:
            assert [status(r.base, token) for r in group] == [200] * 3
        revoked = run_cli(
            "revoke", "--subject", AS_ISSUER, "erin", "--before", str(instant), "--redis-url", redis_db.url
        )
        assert revoked.returncode == 0, revoked.stderr
        elapsed = seconds_until(lambda: all(status(r.base, t) == 401 for r in group for t in (old, older, no_iat)))
        print(f"\nrevoke --subject: signed out on 3 replicas after {elapsed:.2f} s")
        assert elapsed < 3.0
        for token in (later, other_user, other_issuer):
            assert [status(r.base, token) for r in group] == [200] * 3
        # Without --before: now. Every token of erin's at this issuer issued so far is refused.
        time.sleep(1.1)
        assert run_cli("revoke", "--subject", AS_ISSUER, "erin", "--redis-url", redis_db.url).returncode == 0
        seconds_until(lambda: all(status(r.base, later) == 401 for r in group))
        assert [status(r.base, other_issuer) for r in group] == [200] * 3
        assert all(asked(introspection, t) == 1 for t in tokens)


def test_an_api_key_revoked_by_subject_is_refused_by_every_replica_through_revocation_check(
    redis_db: RedisServer,
) -> None:
    revoked_key, _ = new_api_key()
    kept_key, _ = new_api_key()
    SECRETS.update({revoked_key, kept_key})
    keys: dict[str, dict[str, Any]] = {revoked_key: {"sub": "ci-bot", "scopes": ["read"]}, kept_key: {"sub": "bot"}}
    with replicas(2, redis_db.url, lambda: StaticTokenProvider(keys), ttl=None) as group:
        assert [status(r.base, k) for r in group for k in keys] == [200] * 4
        # The same subject at an IdP is another user: its revocation must not sign the key out.
        group[0].store.revoke_subject(AS_ISSUER, "ci-bot")
        time.sleep(1.5)
        assert [status(r.base, revoked_key) for r in group] == [200, 200]
        group[1].store.revoke_subject(API_KEYS, "ci-bot")
        elapsed = seconds_until(lambda: [status(r.base, revoked_key) for r in group] == [401, 401])
        print(f"\nAPI key revoked by subject: refused on both replicas after {elapsed:.2f} s")
        assert elapsed < 3.0
        assert [status(r.base, kept_key) for r in group] == [200, 200]
        assert get(group[0].base, revoked_key)[1]["www-authenticate"].startswith('Bearer error="invalid_token"')


# --- the throttle's budget holds across replicas ---------------------------------------------------


def test_a_spray_over_three_replicas_costs_the_token_service_at_most_n_plus_two_calls_per_window(
    redis_db: RedisServer, introspection: IntrospectionEndpoint
) -> None:
    budget, window = 5, 4.0
    with replicas(
        3, redis_db.url, lambda: introspector(introspection), max_failures=budget, failure_window=window
    ) as group:
        for attempt in (1, 2):
            start, before = time.monotonic(), asked(introspection)
            answers = [status(group[n % 3].base, opaque(f"sprayed-{attempt}-{n}")) for n in range(45)]
            spent = asked(introspection) - before
            print(f"\nspray {attempt}: 45 made-up tokens over 3 replicas cost {spent} introspections (budget {budget})")
            assert time.monotonic() - start < window, "the spray outlasted the window: nothing to conclude"
            assert budget <= spent <= budget + len(group) - 1
            assert set(answers) == {401, 429} and answers[:budget] == [401] * budget
            time.sleep(1.0)  # every replica's reader has seen the throttle
            for replica in group:
                refused = get(replica.base, opaque(f"late-{attempt}"))
                assert refused[0] == 429 and 1 <= int(refused[1]["retry-after"]) <= window
            assert asked(introspection) - before == spent  # a throttled request asks nobody
            time.sleep(window + 0.5)  # the next window: a new budget


def status_from(source: str, base: str, token: str) -> int:
    """A request from another loopback address (127.0.0.0/8 is all this machine's): another client to the throttle."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=20, source_address=(source, 0))
    try:
        connection.request("GET", "/", headers={"Authorization": f"Bearer {token}"})
        return connection.getresponse().status
    finally:
        connection.close()


def throttle_entries(client: Any) -> list[float]:
    """Until when each address the store has throttled stays so, however the store keeps them."""
    ends: list[float] = []
    for key in client.scan_iter(match="mcp_bearer:throttled*"):
        kind = client.type(key).decode()
        assert kind in ("hash", "zset"), kind
        if kind == "hash":
            ends += [float(until) for until in client.hvals(key)]
        else:
            ends += [score for _, score in client.zrange(key, 0, -1, withscores=True)]
    return ends


def test_throttled_addresses_are_forgotten_in_redis_once_their_window_has_passed(
    redis_db: RedisServer, introspection: IntrospectionEndpoint
) -> None:
    """Every replica reads the throttled addresses at every poll: kept for good, a spray from many addresses
    (an IPv6 prefix holds billions) would grow that read without bound, on Redis and on every replica."""
    budget, window = 2, 2.0
    sources = [f"127.0.0.{n}" for n in range(2, 8)]
    throttle: dict[str, Any] = {"max_failures": budget, "failure_window": window}
    with replicas(2, redis_db.url, lambda: introspector(introspection), **throttle) as (a, b):
        for source in sources:
            answers = [status_from(source, (a, b)[n % 2].base, opaque(f"{source}-{n}")) for n in range(budget + 2)]
            assert answers[:budget] == [401] * budget and answers[-1] == 429
        client = redis_db.client()
        seconds_until(lambda: len(throttle_entries(client)) == len(sources))
        time.sleep(window + 1.5)  # every window has passed, and every reader has polled since
        assert status_from(sources[0], a.base, opaque("after-the-window")) == 401  # a new window, a new budget
        assert [until for until in throttle_entries(client) if until <= time.time()] == []


# --- Redis down: answers as documented, never a 500, never a hang; sharing resumes on its own -------


@pytest.mark.parametrize("fault", ["stopped", "frozen"])
def test_redis_down_mid_run_fails_closed_without_hanging_and_recovers_without_a_restart(
    introspection: IntrospectionEndpoint, fault: str
) -> None:
    with redis_server() as server, mcp_bearer_log() as records:
        warm, revoked = grant(introspection, "warm"), grant(introspection, "revoked-before")
        with replicas(2, server.url, lambda: introspector(introspection)) as group:
            group[0].store.revoke_jti("jti-revoked-before", until=time.time() + 3600)
            seconds_until(lambda: [status(r.base, revoked) for r in group] == [401, 401])
            assert [status(r.base, warm) for r in group] == [200, 200]
            server.stop() if fault == "stopped" else server.freeze()
            down_at, seen = time.monotonic(), list[tuple[int, str | None, float]]()
            newcomer = grant(introspection, "newcomer")
            while not (seen and seen[-1][0] == 503) and time.monotonic() - down_at < WAIT:
                for replica in group:
                    for token in (warm, newcomer):
                        start = time.monotonic()
                        answer = get(replica.base, token)
                        seen.append((answer[0], answer[1].get("retry-after"), time.monotonic() - start))
            slowest, failed_at = max(s[2] for s in seen), time.monotonic() - down_at
            print(f"\nRedis {fault}: slowest answer {slowest:.2f} s; 503 after {failed_at:.2f} s")
            assert {s[0] for s in seen} <= {200, 503}, seen  # never a 500, never a pass after the copy is stale
            assert slowest < 3.0
            assert seen[-1][0] == 503 and seen[-1][1] == "2"
            assert 1.0 < failed_at < 5.0  # the deny list is trusted about 2 s after its last good read
            assert [status(r.base, warm) for r in group] == [503, 503]
            assert asked(introspection, newcomer) <= 2  # each replica asked the provider, once
            assert len(store_warnings(records)) == 2  # one per replica, not one per request

            server.start() if fault == "stopped" else server.thaw()
            elapsed = seconds_until(lambda: [status(r.base, warm) for r in group] == [200, 200])
            print(f"Redis back: 200 again after {elapsed:.2f} s")
            assert len(store_recoveries(records)) == 2 and len(store_warnings(records)) == 2
            if fault == "frozen":  # its data survived: the revocation still holds
                assert [status(r.base, revoked) for r in group] == [401, 401]
            fresh = grant(introspection, "after")
            assert [status(r.base, fresh) for r in group] == [200, 200] and asked(introspection, fresh) == 1
            group[1].store.revoke_jti("jti-after", until=time.time() + 3600)
            seconds_until(lambda: [status(r.base, fresh) for r in group] == [401, 401], 3.0)

            server.stop()  # a second outage is a second WARNING, then a second recovery
            seconds_until(lambda: len(store_warnings(records)) == 4)
            server.start()
            seconds_until(lambda: len(store_recoveries(records)) == 4)
    assert not [r for r in records if r.levelname == "ERROR"]


def test_a_warm_verdict_with_nothing_revoked_still_fails_closed_once_the_deny_list_is_stale(
    introspection: IntrospectionEndpoint,
) -> None:
    """With nothing revoked a cache hit skips the deny list, but only while the copy is fresh: a revocation
    made while Redis is out of reach could not be seen, so after two seconds the answer is 503."""
    with redis_server() as server:
        warm = grant(introspection, "warm-nothing-revoked")
        with replicas(1, server.url, lambda: introspector(introspection)) as (replica,):
            assert status(replica.base, warm) == 200
            server.stop()
            down_at = time.monotonic()
            seconds_until(lambda: status(replica.base, warm) == 503, 5.0)
            assert time.monotonic() - down_at > 1.0  # trusted about 2 s after its last good read, not less
            assert asked(introspection, warm) == 1  # a local hit all along: the provider was never asked again
            server.start()
            seconds_until(lambda: status(replica.base, warm) == 200)


def test_use_last_deny_list_answers_from_the_last_copy_while_redis_is_down(
    introspection: IntrospectionEndpoint,
) -> None:
    with redis_server() as server, mcp_bearer_log() as records:
        warm, revoked = grant(introspection, "warm"), grant(introspection, "revoked")
        options = {"use_last_deny_list": True}
        with replicas(2, server.url, lambda: introspector(introspection), store_options=options) as group:
            group[0].store.revoke_jti("jti-revoked", until=time.time() + 3600)
            seconds_until(lambda: [status(r.base, revoked) for r in group] == [401, 401])
            assert [status(r.base, warm) for r in group] == [200, 200]
            server.stop()
            time.sleep(3.0)  # well past the 2 s a fail-closed copy is trusted
            newcomer = grant(introspection, "newcomer")
            for replica in group:
                assert status(replica.base, warm) == 200
                assert status(replica.base, revoked) == 401  # the last copy still knows it
                assert status(replica.base, newcomer) == 200  # a verdict from the provider
            assert asked(introspection, newcomer) == 2  # nothing shared while Redis is down
            (warning, _) = store_warnings(records)
            assert "last copy" in warning


def test_a_replica_that_never_read_the_deny_list_refuses_even_with_use_last_deny_list(
    introspection: IntrospectionEndpoint,
) -> None:
    """A replica started during an outage (autoscaling, a crash loop) has no last copy: it cannot tell a
    revoked token from a good one, so it must refuse rather than let every revocation lapse."""
    with redis_server() as server:
        token = grant(introspection, "revoked-earlier")
        RedisStore(server.url).revoke_jti("jti-revoked-earlier", until=time.time() + 3600)
        server.stop()
        options = {"use_last_deny_list": True}
        with replicas(1, server.url, lambda: introspector(introspection), store_options=options) as (late,):
            assert status(late.base, token) == 503
            server.start()  # empty, as a Redis without persistence comes back: now there is a copy to use
            seconds_until(lambda: status(late.base, token) == 200)


@pytest.mark.parametrize("change", ["revoke", "clear"])
def test_a_change_made_right_after_a_redis_restart_reaches_every_replica(
    introspection: IntrospectionEndpoint, change: str
) -> None:
    """A Redis without persistence starts again from nothing, and its counters with it: a change counted
    from there can carry the number a replica already holds from before. Replicas that compared only
    that number would never read it."""
    with redis_server() as server:
        token = grant(introspection, "after-restart", jti="jti-after-restart")
        with replicas(2, server.url, lambda: introspector(introspection)) as group:
            assert [status(r.base, token) for r in group] == [200, 200]  # their readers run from here
            group[0].store.revoke_jti("jti-before-restart", until=time.time() + 3600)  # deny list version 1
            assert group[0].cache is not None
            group[0].cache.clear()  # generation 1
            time.sleep(1.5)  # both readers have seen both
            assert [status(r.base, token) for r in group] == [200, 200] and asked(introspection, token) == 2
            server.stop()
            # Back with a password the replicas do not have, so that the change below is in before any
            # replica reads again, as it is when an operator acts within the first half second.
            server.start(requirepass=PASSWORD)
            operator = RedisStore(f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/0")
            try:
                if change == "revoke":
                    operator.revoke_jti("jti-after-restart", until=time.time() + 3600)
                else:
                    del introspection.answers[token]
                    CachedProvider(introspector(introspection), store=operator).clear()
                    seconds_until(lambda: server.client(PASSWORD).get("mcp_bearer:generation") is not None)
            finally:
                operator.close()
            server.client(PASSWORD).config_set("requirepass", "")
            elapsed = seconds_until(lambda: [status(r.base, token) for r in group] == [401, 401])
            print(f"\n{change} right after a restart: refused on both replicas after {elapsed:.2f} s")


def test_the_deny_list_in_redis_keeps_an_entry_only_while_the_tokens_it_covers_live(redis_db: RedisServer) -> None:
    """Kept for good, revocations would pile up in Redis and be read whole by every replica at each change."""
    store = RedisStore(redis_db.url, max_token_lifetime=60)
    client = redis_db.client()
    try:
        now = time.time()
        store.revoke_jti("expires-soon", until=now + 1)
        store.revoke_subject(AS_ISSUER, "signed-out-long-ago", before=now - 59)  # its tokens live one more second
        store.revoke_jti("expires-later", until=now + 3600)
        store.revoke_subject(AS_ISSUER, "signed-out-now")
        assert len(client.hkeys("mcp_bearer:deny")) == 4
        time.sleep(max(0.0, now + 1.2 - time.time()))
        store.revoke_jti("revoked-last", until=time.time() + 3600)  # each change drops what has expired
        kept = sorted(name.decode() for name in client.hkeys("mcp_bearer:deny"))
        assert kept == ["jti:expires-later", "jti:revoked-last", 'sub:["https://as.example.com/", "signed-out-now"]']
    finally:
        store.close()


# --- secrets: no token in Redis, no password in a repr, a log or the command line's output ---------


def test_no_token_client_secret_or_password_is_ever_written_to_redis(introspection: IntrospectionEndpoint) -> None:
    api_key, _ = new_api_key()
    SECRETS.add(api_key)
    public_pem = private_key("rs1").public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    def chain() -> BearerAuthProvider:
        return ProviderChain(
            StaticTokenProvider({**TOKENS, api_key: {"sub": "ci-bot"}}),
            JWTProvider(issuer=ISSUER, audience=AUDIENCE, key=public_pem),
            introspector(introspection),
        )

    token_jwt, revoked_jwt = sign(jti="jti-jwt"), sign(jti="jti-jwt-revoked", sub="gina")
    opaque_token = grant(introspection, "opaque")
    used = [api_key, *TOKENS, token_jwt, revoked_jwt, opaque_token]
    with redis_server(PASSWORD) as server:
        with replicas(2, server.url, chain, max_failures=3) as (a, b):
            for token in used:
                assert {status(a.base, token), status(b.base, token)} == {200}
            a.store.revoke_jti("jti-jwt-revoked", until=time.time() + 600)
            b.store.revoke_subject(API_KEYS, "ci-bot")
            seconds_until(lambda: status(b.base, revoked_jwt) == 401 and status(a.base, api_key) == 401)
            assert a.cache is not None and b.cache is not None
            a.cache.invalidate(opaque_token)
            assert status(b.base, opaque_token) == 200
            for n in range(6):  # refused tokens, counted by the throttle in Redis
                status((a, b)[n % 2].base, f"sk-guess-{n}-Xk29Lq")
            b.cache.clear()
            for token in used:
                status(a.base, token)  # kept again, under the new generation
            time.sleep(1.0)  # the invalidation and the failure counts are written by worker threads
        stored = server.contents()
    assert "verdict:" in stored and "deny" in stored and "failures:" in stored and "invalidated" in stored
    forbidden = {*used, *(f"sk-guess-{n}-Xk29Lq" for n in range(6)), CLIENT_SECRET, "127.0.0.1"}
    assert not [secret[:12] for secret in forbidden if secret in stored]
    assert not shown([stored])


def shown(texts: Sequence[str]) -> list[str]:
    """The parts of the password that any of these texts shows (as it is, or lowercased as a host name)."""
    return [part for part in FRAGMENTS for text in texts if part in text or part.lower() in text]


def test_a_store_url_with_a_password_works_and_the_password_is_never_shown(
    introspection: IntrospectionEndpoint,
) -> None:
    with redis_server(PASSWORD) as server, mcp_bearer_log() as records:
        token = grant(introspection, "password")
        with replicas(2, server.url, lambda: introspector(introspection)) as (a, b):
            assert status(a.base, token) == status(b.base, token) == 200 and asked(introspection, token) == 1
            assert repr(a.store) == f"RedisStore('redis://127.0.0.1:{server.port}/0', prefix='mcp_bearer:')"
            a.store.revoke_jti("jti-password", until=time.time() + 600)
            seconds_until(lambda: status(b.base, token) == 401)
        env = {"MCP_BEARER_CLIENT_SECRET": CLIENT_SECRET, "MCP_BEARER_REDIS_URL": server.url}
        serving = ["--introspection-url", introspection.url, "--client-id", CLIENT_ID, "--cache-ttl", "60"]
        with cli_replicas(1, *serving, env=env) as ((base, banner, stderr),):
            assert status(base, grant(introspection, "cli-password")) == 200
            server.stop()  # the replica logs its outage on stderr: where the store is, never its password
            time.sleep(1.5)
            server.start()
            time.sleep(1.0)
        outputs = ["\n".join(banner), "\n".join(stderr)]
        assert "unreachable" in outputs[1]
        encoded = quote(PASSWORD, safe="")
        for url in (
            f"redis://:{encoded}x@127.0.0.1:{server.port}/0",  # a wrong password
            f"redis://:{encoded}@127.0.0.1:{free_port()}/0",  # nothing listening
            f"http://:{encoded}@127.0.0.1:{server.port}/0",  # not a Redis URL
            f"{server.url}?db=x",  # a bad option
            f"redis://:{encoded}@127.0.0.1:99999/0",  # a port out of range
        ):
            failed = run_cli("revoke", "--jti", "j", "--until", "9999999999", "--redis-url", url)
            assert failed.returncode == 2 and failed.stderr.startswith("mcp_bearer: error:"), failed.stderr
            outputs += [failed.stdout, failed.stderr]
        not_redis = {"MCP_BEARER_REDIS_URL": f"ftp://u:{encoded}@127.0.0.1/0"}
        refused = run_cli("support:claims_echo", "--port", "0", env=not_redis)
        assert refused.returncode == 2
        outputs += [refused.stdout, refused.stderr]
    assert not shown(outputs + [record_text(r) for r in records])


@pytest.mark.parametrize(
    ("password", "cli"),
    [
        (f"{FRAGMENTS[0]}/{FRAGMENTS[1]}", True),
        (f"{FRAGMENTS[0]}?{FRAGMENTS[1]}", True),
        (f"{FRAGMENTS[0]}#{FRAGMENTS[1]}", True),
        (f"{FRAGMENTS[0]}@{FRAGMENTS[1]}/{FRAGMENTS[2]}", False),  # would name a host: no lookup from here
    ],
    ids=["slash", "question-mark", "hash", "at-and-slash"],
)
def test_a_password_left_unencoded_in_the_store_url_is_refused_without_showing_any_of_it(
    password: str, cli: bool
) -> None:
    """Operators paste passwords into URLs as they are. Unencoded, a '/', '?' or '#' ends the host part
    early, and the password's rest is read as a port, a host or a path: whatever quotes those quotes it."""
    url = f"redis://:{password}@127.0.0.1:{free_port()}/0"
    texts = []
    try:
        store = RedisStore(url)
    except ValueError as exc:
        texts.append(str(exc))
    else:
        texts.append(repr(store))
        store.close()
    if cli:
        for args in (["revoke", "--jti", "j", "--until", "9999999999"], ["support:claims_echo", "--port", "0"]):
            failed = run_cli(*args, env={"MCP_BEARER_REDIS_URL": url})
            assert failed.returncode == 2, failed.stderr
            texts += [failed.stdout, failed.stderr]
    assert not shown(texts), texts


# --- trio, and the MCP SDK's clients on both protocol generations -----------------------------------


def test_an_asyncio_and_a_trio_replica_share_verdicts_invalidations_and_revocations(
    redis_db: RedisServer, introspection: IntrospectionEndpoint
) -> None:
    token, revoked = grant(introspection, "trio"), grant(introspection, "trio-revoked")
    servers = ("uvicorn", "hypercorn-trio")
    with replicas(2, redis_db.url, lambda: introspector(introspection), servers=servers) as (on_asyncio, on_trio):
        for t in (token, revoked):
            assert status(on_asyncio.base, t) == status(on_trio.base, t) == 200 and asked(introspection, t) == 1
        on_asyncio.store.revoke_jti("jti-trio-revoked", until=time.time() + 600)
        seconds_until(lambda: status(on_trio.base, revoked) == 401, 3.0)
        assert on_trio.cache is not None
        del introspection.answers[token]
        on_trio.cache.invalidate(token)
        seconds_until(lambda: status(on_asyncio.base, token) == 401, 2.0)


def test_cached_provider_with_a_store_under_trio_run(
    redis_db: RedisServer, introspection: IntrospectionEndpoint
) -> None:
    import trio

    token = grant(introspection, "trio-run")
    first, second = RedisStore(redis_db.url), RedisStore(redis_db.url)
    try:

        async def verdicts() -> list[AccessToken | None]:
            one = CachedProvider(introspector(introspection), ttl=60, store=first)
            two = CachedProvider(introspector(introspection), ttl=60, store=second)
            return [await one.verify_token(token), await two.verify_token(token)]

        answers = trio.run(verdicts)
        assert [a is not None and a.claims["sub"] for a in answers] == ["dana", "dana"]
        assert asked(introspection, token) == 1  # the second came from Redis, read in a worker thread
    finally:
        first.close()
        second.close()


def mcp_connect(url: str, generation: str, token: str, statuses: list[int]) -> Any:
    """The SDK's client with this token, speaking ``generation``. ``statuses`` gets the HTTP status of
    every response, since the SDKs do not all say it in their errors."""

    async def note(response: httpx.Response) -> None:
        statuses.append(response.status_code)

    headers = {"Authorization": f"Bearer {token}"}
    return sdk_client(url, generation, headers=headers, event_hooks={"response": [note]})


@pytest.mark.anyio
@pytest.mark.parametrize("generation", GENERATIONS)
async def test_mcp_clients_on_two_replicas_under_a_root_path_are_signed_out_together(
    redis_db: RedisServer, introspection: IntrospectionEndpoint, generation: str
) -> None:
    token = grant(introspection, f"mcp-{generation}", sub="hana", iat=int(time.time()) - 30)
    with contextlib.ExitStack() as stack:
        stores = [RedisStore(redis_db.url) for _ in range(2)]
        for store in stores:
            stack.callback(store.close)
        bases = [
            stack.enter_context(
                serve(
                    BearerAuthMiddleware(
                        mcp_app(whoami), CachedProvider(introspector(introspection), ttl=60, store=store), store=store
                    ),
                    root_path="/api",
                )
            )
            for store in stores
        ]
        statuses: list[int] = []
        for base in bases:
            async with mcp_connect(base + "/mcp", generation, token, statuses) as client:
                result = await client.call_tool("whoami", {})
                assert json.loads(tool_text(result))["claims"]["sub"] == "hana"
        assert asked(introspection, token) == 1
        stores[0].revoke_subject(AS_ISSUER, "hana")
        await anyio.to_thread.run_sync(
            lambda: seconds_until(lambda: [status(b, token) for b in bases] == [401, 401], 3.0)
        )
        for base in bases:
            statuses.clear()
            try:
                async with mcp_connect(base + "/mcp", generation, token, statuses) as client:
                    await client.call_tool("whoami", {})
            except Exception:  # each SDK generation raises its own type
                pass
            else:
                raise AssertionError("the revoked token opened a session")
            assert statuses and set(statuses) == {401}  # 2026-07-28 probes server/discover, then initializes
