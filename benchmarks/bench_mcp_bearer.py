"""Benchmark of mcp_bearer.BearerAuthMiddleware: per-request cost, memory and end-to-end throughput.

Micro (always): one trivial ASGI app (200, body ``ok``) called directly, without network, served

- bare;
- through ``BearerAuthMiddleware`` + ``StaticTokenProvider``: valid token, missing token, invalid token, excluded path;
- through the MCP SDK's own stack (Starlette ``AuthenticationMiddleware`` + ``BearerAuthBackend``, then
  ``AuthContextMiddleware``, then ``RequireAuthMiddleware``) with an equivalent dict/digest ``TokenVerifier``;
- through an equivalent Starlette ``BaseHTTPMiddleware``;
- through ``BearerAuthMiddleware`` + ``JWTProvider`` (static ``key=``, so no network) on a valid RS256, ES256 and
  EdDSA token, next to its reference: the static-key path plus one ``jwt.decode`` of the same token;
- through ``BearerAuthMiddleware`` + ``CachedProvider`` holding the token (a cache hit), and with ``audit=True``
  (records formatted and written to /dev/null), both next to the plain ``StaticTokenProvider`` request;
- with ``--baseline REF`` (repeatable): also the module as it was at each git REF (valid token, missing token),
  paired per round with this checkout's, to show what a change costs. Those rows come from
  ``bench_builds.py``, run in a process of its own that loads no SDK (its docstring says why).

Each round runs N requests of every variant in turn (start rotated per round) in one event loop; a variant's
time is the median over rounds of its per-round mean, its overhead the median of the per-round differences to
bare. Bare therefore includes the harness (a scope copy, an ``await``, two discarded sends). These are hot-cache
numbers: between the requests of a real MCP server the same middleware code runs several times slower.

Memory (always): tracemalloc peak and retained bytes for valid-token requests (bare, ours, SDK stack).

End to end (``--e2e``, needs ``wrk`` on PATH): an MCP server with one tool (stateless, JSON responses) under
uvicorn on loopback, with and without the middleware, loaded by ``wrk`` in alternating rounds: ``tools/call``
requests per second with and without the middleware, and 401 rejections per second; and the same with
``CachedProvider(IntrospectionProvider(...))`` against an RFC 7662 endpoint (another process) that answers in
~5 ms, with the number of introspections it served. Both servers get the same
request bytes; with 2+ cores the servers and wrk are pinned to different cores. Small shared VMs drift by a few
percent between runs, so read the per-round ratios, not only their median.

Targets are printed as PASS/MISS for information only; the exit code is 0 unless the benchmark itself breaks.

Run from the repository root::

    python benchmarks/bench_mcp_bearer.py            # micro + memory, ~20 s
    python benchmarks/bench_mcp_bearer.py --quick    # a few seconds: the CI smoke check
    python benchmarks/bench_mcp_bearer.py --e2e      # adds the uvicorn + wrk run, ~45 s more
    python benchmarks/bench_mcp_bearer.py --json     # machine-readable results on stdout
    python benchmarks/bench_mcp_bearer.py --baseline HEAD~3   # adds that commit's module, side by side
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import secrets
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Benchmark the checkout this script lives in, even when another mcp_bearer is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_builds import (  # the requests and app both benchmarks time, from the stdlib-only one
    CLAIMS,
    MCP_HEADERS,
    OPERATION_SCOPES,
    VALID_TOKEN,
    hello_app,
    make_scope,
    receive_request,
    receive_tools_call,
    timed_batch,
)
from bench_builds import report as print_builds

from mcp_bearer import (
    AccessToken,
    ASGIApp,
    BearerAuthMiddleware,
    BearerAuthProvider,
    CachedProvider,
    IntrospectionProvider,
    JWTProvider,
    Message,
    Receive,
    RedisStore,
    StaticTokenProvider,
)

try:
    import jwt
    import uvicorn
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
    from mcp.server.auth.middleware.bearer_auth import BearerAuthBackend, RequireAuthMiddleware
    from mcp.server.auth.provider import AccessToken as SdkAccessToken
    from starlette.middleware.authentication import AuthenticationMiddleware
    from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
except ImportError as exc:  # pragma: no cover - a clear message instead of a traceback
    raise SystemExit(f"bench_mcp_bearer: needs mcp, starlette and uvicorn (pip install -e '.[test]'): {exc}") from exc

INVALID_TOKEN = secrets.token_urlsafe(32)
SERVER_KEY_ENV = "BENCH_MCP_BEARER_TOKEN"  # passes VALID_TOKEN to the e2e server process

TOOLS_CALL = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {"name": "add", "arguments": {"a": 1, "b": 2}},
}
# Informational targets (PASS/MISS never changes the exit code).
TARGET_VALID_RATIO = 0.15  # ours' valid-token overhead / SDK stack's valid-token overhead
TARGET_MISSING_VS_BARE = 1.5  # ours' missing-token 401 time / bare time
TARGET_EXCLUDED_US = 0.1  # |ours on an excluded path - bare|, microseconds
TARGET_E2E_RATIO = 0.97  # tools/call requests per second with the middleware / without
TARGET_JWT_RATIO = 1.1  # JWTProvider's valid RS256 request / (static-key path + one jwt.decode)
TARGET_CACHE_RATIO = 1.25  # a CachedProvider hit / the same request with StaticTokenProvider
TARGET_INTROSPECTION_E2E = 0.9  # tools/call rps, cached introspection / StaticTokenProvider
TARGET_OPERATION_US = 5.0  # operation_scopes on a 300-byte tools/call, over the same request without it
TARGET_SDK_IDENTITY_US = 0.5  # the caller handed to the MCP SDK, when nothing reads it
TARGET_STORE_LOCAL_US = 0.2  # a CachedProvider local hit with a RedisStore, over one without
TARGET_STORE_SHARED_MS = 0.5  # a verdict answered from Redis on loopback (a local miss), p50
INTROSPECTION_DELAY = 0.005  # seconds the e2e introspection endpoint takes per answer


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


# --- the app and its three guards ---------------------------------------------------------------


class DictTokenVerifier:
    """An SDK ``TokenVerifier`` equivalent to ``StaticTokenProvider``: SHA-256 digest -> SDK ``AccessToken``."""

    def __init__(self, tokens: Mapping[str, Mapping[str, Any]]) -> None:
        self._by_digest = {_digest(t): (str(c.get("sub", "")), list(c.get("scopes", []))) for t, c in tokens.items()}

    async def verify_token(self, token: str) -> SdkAccessToken | None:
        entry = self._by_digest.get(_digest(token))
        if entry is None:
            return None
        client_id, scopes = entry
        return SdkAccessToken(token=token, client_id=client_id, scopes=list(scopes))


class DictBearerHTTPMiddleware(BaseHTTPMiddleware):
    """The "obvious" Starlette way: a dispatch that looks the header up in a dict, else a JSON 401."""

    def __init__(self, app: ASGIApp, tokens: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__(app)
        self._claims = {_digest(t): dict(c) for t, c in tokens.items()}

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        claims = self._claims.get(_digest(token.strip())) if scheme.lower() == "bearer" else None
        if claims is None:
            return JSONResponse(
                {"error": "invalid_token", "error_description": "Authentication required"},
                status_code=401,
                headers={"www-authenticate": 'Bearer error="invalid_token"'},
            )
        request.state.access_token = claims
        return await call_next(request)


def ours(app: ASGIApp, token: str = VALID_TOKEN, **options: Any) -> ASGIApp:
    # sdk_identity=False: hello_app is no MCP SDK app (this process loads the SDK for its own stack).
    return BearerAuthMiddleware(app, StaticTokenProvider({token: CLAIMS}), **{"sdk_identity": False, **options})


def sdk_stack(app: ASGIApp) -> ASGIApp:
    required = RequireAuthMiddleware(app, required_scopes=[])
    backend = BearerAuthBackend(DictTokenVerifier({VALID_TOKEN: CLAIMS}))
    return AuthenticationMiddleware(AuthContextMiddleware(required), backend=backend)


def base_http(app: ASGIApp) -> ASGIApp:
    return DictBearerHTTPMiddleware(app, {VALID_TOKEN: CLAIMS})


# --- JWT: JWTProvider vs the static-key path plus one jwt.decode -------------------------------

JWT_ISSUER, JWT_AUDIENCE = "https://auth.example.com/", "https://mcp.example.com/mcp"
JWT_OPTIONS: dict[str, Any] = {"require": ["exp", "iss", "aud", "sub"]}


def jwt_case(algorithm: str) -> tuple[str, str, Any]:
    """(public PEM, a valid token, the prepared public key object) for one algorithm."""
    private: Any = {
        "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate,
    }[algorithm]()
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    claims = {**CLAIMS, "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "exp": int(time.time()) + 86400, "scope": "mcp"}
    token = jwt.encode(claims, private, algorithm=algorithm, headers={"kid": "k1"})
    return pem, token, jwt.get_algorithm_by_name(algorithm).prepare_key(pem)


class StaticPlusDecode(BearerAuthProvider):
    """The reference: ``StaticTokenProvider``'s lookup plus one ``jwt.decode`` with a prepared key."""

    def __init__(self, token: str, algorithm: str, key: Any) -> None:
        self.static = StaticTokenProvider({token: CLAIMS})
        self.algorithm, self.key = algorithm, key

    async def verify_token(self, token: str) -> AccessToken | None:
        access = await self.static.verify_token(token)
        jwt.decode(
            token,
            key=self.key,
            algorithms=[self.algorithm],
            audience=JWT_AUDIENCE,
            issuer=JWT_ISSUER,
            leeway=30.0,
            options=JWT_OPTIONS,
        )
        return access


# --- caching, the audit trail, and an earlier version of the module ----------------------------


def audited(app: ASGIApp) -> ASGIApp:
    """``audit=True`` with its records formatted and written somewhere, as a deployment would."""
    audit = logging.getLogger("mcp_bearer.audit")
    audit.setLevel(logging.INFO)
    audit.propagate = False
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    audit.addHandler(handler)
    return ours(app, audit=True)


# --- the micro benchmark ------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    guard: str  # "bare", "ours", "sdk", "basehttp"
    case: str  # "valid", "missing", "invalid", "excluded"
    app: ASGIApp
    template: dict[str, Any]
    expected_status: int
    against: str | None = None  # the variant this one is paired with per round (ratio, difference)
    receive: Receive | None = None  # the request body the app may read; default: a 2-byte "{}"
    rounds_ns: list[float] = field(default_factory=list)  # per-round mean ns per request


def build_variants(store: RedisStore | None = None) -> list[Variant]:
    valid, missing, invalid = (make_scope("/mcp", token) for token in (VALID_TOKEN, None, INVALID_TOKEN))
    variants = [Variant("bare", "bare", "valid", hello_app, valid, 200)]
    guards = (("ours", "ours", ours), ("sdk", "SDK stack", sdk_stack), ("basehttp", "BaseHTTP", base_http))
    for guard, label, wrap in guards:
        app = wrap(hello_app)
        variants.append(Variant(f"{label}: valid token", guard, "valid", app, valid, 200))
        variants.append(Variant(f"{label}: missing token", guard, "missing", app, missing, 401))
        variants.append(Variant(f"{label}: invalid token", guard, "invalid", app, invalid, 401))
        if guard == "ours":
            variants.append(Variant("ours: excluded path", guard, "excluded", app, make_scope("/health", None), 200))
    for algorithm in ("RS256", "ES256", "EdDSA"):
        pem, token, key = jwt_case(algorithm)
        scope = make_scope("/mcp", token)
        provider = JWTProvider(issuer=JWT_ISSUER, audience=JWT_AUDIENCE, key=pem, algorithms=[algorithm])
        jwt_app = BearerAuthMiddleware(hello_app, provider, sdk_identity=False)
        reference = BearerAuthMiddleware(hello_app, StaticPlusDecode(token, algorithm, key), sdk_identity=False)
        variants.append(Variant(f"JWT {algorithm}: valid token", "jwt", algorithm, jwt_app, scope, 200))
        variants.append(Variant(f"static+decode {algorithm}", "reference", algorithm, reference, scope, 200))
    static = "ours: valid token"
    cached = BearerAuthMiddleware(
        hello_app, CachedProvider(StaticTokenProvider({VALID_TOKEN: CLAIMS})), sdk_identity=False
    )
    variants.append(Variant("ours: cached token", "cache", "valid", cached, valid, 200, static))
    if store is not None:  # a local hit with a store: the deny-list check, from its local copy
        provider = CachedProvider(StaticTokenProvider({VALID_TOKEN: CLAIMS}), store=store)
        app = BearerAuthMiddleware(hello_app, provider, sdk_identity=False)
        variants.append(Variant("ours: cached, with a store", "cache", "valid", app, valid, 200, "ours: cached token"))
    variants.append(Variant("ours: valid, audit=True", "audit", "valid", audited(hello_app), valid, 200, static))
    sdk = ours(hello_app, sdk_identity=True)
    variants.append(Variant("ours: valid, SDK identity", "sdk-identity", "valid", sdk, valid, 200, static))
    # A tools/call with a 300-byte body, with and without operation_scopes (which reads and parses it).
    call = make_scope("/mcp", VALID_TOKEN)
    plain_call = "ours: tools/call 300 B"
    variants.append(Variant(plain_call, "ops", "without", ours(hello_app), call, 200, receive=receive_tools_call))
    guarded = ours(hello_app, operation_scopes=OPERATION_SCOPES)
    name = "ours: same, operation_scopes"
    variants.append(Variant(name, "ops", "with", guarded, call, 200, plain_call, receive_tools_call))
    return variants


async def check_status(variant: Variant) -> None:
    """One request with a recording ``send``: refuse to time an unexpected status or a response from elsewhere."""
    messages: list[Message] = []

    async def record(message: Message) -> None:
        messages.append(message)

    scope = dict(variant.template, state={})
    await variant.app(scope, variant.receive or receive_request, record)
    status = next((m["status"] for m in messages if m["type"] == "http.response.start"), None)
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    reached_app = body == b"ok"
    if status != variant.expected_status or reached_app != (variant.expected_status == 200):
        raise SystemExit(
            f"bench_mcp_bearer: {variant.name!r} answered {status} {body[:80]!r}, "
            f"expected {variant.expected_status}; refusing to time it"
        )


async def run_micro(variants: list[Variant], requests: int, rounds: int, log: Callable[[str], None]) -> None:
    for variant in variants:
        await check_status(variant)
    for variant in variants:  # warm-up round, not recorded
        await timed_batch(variant.app, variant.template, requests, variant.receive)
    for index in range(rounds):
        log(f"micro: round {index + 1}/{rounds}")
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            elapsed = await timed_batch(variant.app, variant.template, requests, variant.receive)
            variant.rounds_ns.append(elapsed / requests)


def summarize_micro(variants: list[Variant]) -> dict[str, dict[str, Any]]:
    bare = variants[0].rounds_ns
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        times = variant.rounds_ns
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        results[variant.name] = {
            "guard": variant.guard,
            "case": variant.case,
            "median_us": statistics.median(times) / 1000,
            "p25_us": quartiles[0] / 1000,
            "p75_us": quartiles[2] / 1000,
            # Paired per round, so drift between rounds cancels.
            "overhead_us": statistics.median(t - b for t, b in zip(times, bare, strict=True)) / 1000,
            "rounds_us": [round(t / 1000, 4) for t in times],
        }
    for result in results.values():
        sdk = next((r for r in results.values() if r["guard"] == "sdk" and r["case"] == result["case"]), None)
        if result["guard"] in ("ours", "basehttp") and sdk is not None and sdk["overhead_us"] > 0:
            result["overhead_vs_sdk"] = result["overhead_us"] / sdk["overhead_us"]
        else:
            result["overhead_vs_sdk"] = None
    by_name = {v.name: v for v in variants}
    for variant in variants:
        if variant.guard == "jwt":  # paired per round against its reference, like the overheads
            reference = by_name[f"static+decode {variant.case}"].rounds_ns
            ratios = [t / r for t, r in zip(variant.rounds_ns, reference, strict=True)]
            results[variant.name]["vs_static_decode"] = statistics.median(ratios)
        if variant.against is not None:  # paired per round with the variant it is measured against
            against = by_name[variant.against].rounds_ns
            ratios = [t / r for t, r in zip(variant.rounds_ns, against, strict=True)]
            differences = [t - r for t, r in zip(variant.rounds_ns, against, strict=True)]
            results[variant.name]["against"] = variant.against
            results[variant.name]["vs_against"] = statistics.median(ratios)
            results[variant.name]["minus_against_us"] = statistics.median(differences) / 1000
    return results


# --- memory -------------------------------------------------------------------------------------


async def measure_memory(app: ASGIApp, template: dict[str, Any], requests: int) -> dict[str, int]:
    """tracemalloc over ``requests`` valid-token requests: peak above the start, and what a gc.collect leaves."""
    await timed_batch(app, template, 1000)  # first-call caches are not per-request memory
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        await timed_batch(app, template, requests)
        peak = tracemalloc.get_traced_memory()[1] - before
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return {"requests": requests, "peak_bytes": peak, "retained_bytes": retained}


# --- end to end ---------------------------------------------------------------------------------


def mcp_app() -> ASGIApp:
    """An MCP server with one tool, stateless and answering JSON; mcp 2.x or 1.x."""

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    server: Any
    try:
        server = importlib.import_module("mcp.server.mcpserver").MCPServer("bench", log_level="WARNING")
        server.tool()(add)
        app: ASGIApp = server.streamable_http_app(stateless_http=True, json_response=True)
    except ImportError:  # mcp 1.x
        fastmcp = importlib.import_module("mcp.server.fastmcp")
        server = fastmcp.FastMCP("bench", stateless_http=True, json_response=True, log_level="WARNING")
        server.tool()(add)
        app = server.streamable_http_app()
    return app


def serve(kind: str) -> None:
    """Child-process entry point: print the port, then serve until terminated."""
    logging.getLogger("mcp").setLevel(logging.WARNING)
    app = mcp_app()
    if kind == "ours":
        app = ours(app, os.environ[SERVER_KEY_ENV])
    elif kind == "introspection":
        endpoint = f"http://127.0.0.1:{os.environ[INTROSPECTION_PORT_ENV]}/introspect"
        introspection = IntrospectionProvider(endpoint, client_id="bench", client_secret=secrets.token_urlsafe(16))
        app = BearerAuthMiddleware(app, CachedProvider(introspection, ttl=300.0))
    # proto=IPPROTO_TCP, not socket.create_server's 0: asyncio sets TCP_NODELAY on accepted connections only when
    # the listener's proto is IPPROTO_TCP; without it every response waits ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


INTROSPECTION_PORT_ENV = "BENCH_MCP_BEARER_INTROSPECTION_PORT"


def serve_introspection() -> None:
    """Child-process entry point: an RFC 7662 endpoint that takes ~5 ms and counts what it answered."""
    import http.server
    import threading

    hits = 0
    lock = threading.Lock()

    class Endpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            nonlocal hits
            self.rfile.read(int(self.headers.get("content-length", 0)))
            time.sleep(INTROSPECTION_DELAY)
            with lock:
                hits += 1
            self.answer({"active": True, "sub": "bench-user", "scope": "mcp", "exp": int(time.time()) + 3600})

        def do_GET(self) -> None:
            self.answer({"hits": hits})

        def answer(self, document: dict[str, Any]) -> None:
            body = json.dumps(document).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def introspection_hits(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/hits", timeout=10) as response:
        return int(json.loads(response.read())["hits"])


def post_tools_call(port: int, token: str | None) -> tuple[int, bytes]:
    headers = dict(MCP_HEADERS)
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/mcp", data=json.dumps(TOOLS_CALL).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def check_tools_call(port: int, token: str | None) -> None:
    status, body = post_tools_call(port, token)
    try:
        result = json.loads(body)["result"]
        ok = status == 200 and not result.get("isError") and result["content"][0]["text"] == "3"
    except (ValueError, KeyError, IndexError, TypeError):
        ok = False
    if not ok:
        raise RuntimeError(f"a stateless tools/call without initialize failed: {status} {body[:200]!r}")


WRK_LUA = f"""-- written by bench_mcp_bearer.py: POST one JSON-RPC tools/call per request
wrk.method = "POST"
wrk.body = '{json.dumps(TOOLS_CALL)}'
{chr(10).join(f'wrk.headers["{name}"] = "{value}"' for name, value in MCP_HEADERS.items())}
"""


def run_wrk(wrk: str, lua: str, port: int, token: str | None, seconds: int, connections: int) -> dict[str, Any]:
    command = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", lua]
    if token is not None:
        command += ["-H", f"authorization: Bearer {token}"]
    command.append(f"http://127.0.0.1:{port}/mcp")
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    total = re.search(r"(\d+) requests in", done.stdout)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    errors = re.search(r"Socket errors: (.*)", done.stdout)
    if done.returncode != 0 or rps is None or total is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": errors.group(1) if errors else None,
    }


def _pin(pid: int, cpus: set[int] | None) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(pid, cpus)


def run_e2e(rounds: int, seconds: int, connections: int, log: Callable[[str], None]) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        return {"skipped": "wrk not found on PATH; install it (e.g. apt-get install wrk) to run --e2e"}
    # With 2+ cores: servers on the last core, wrk (a child of this process) on the others, so they do not fight.
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpus, wrk_cpus = ({cpus[-1]}, set(cpus[:-1])) if len(cpus) >= 2 else (None, None)
    servers: dict[str, subprocess.Popen[str]] = {}
    ports: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as directory:
        lua = os.path.join(directory, "wrk_post.lua")
        with open(lua, "w", encoding="utf-8") as file:
            file.write(WRK_LUA)
        try:
            for kind in ("endpoint", "bare", "ours", "introspection"):
                environment = {**os.environ, SERVER_KEY_ENV: VALID_TOKEN}
                if kind != "endpoint":
                    environment[INTROSPECTION_PORT_ENV] = str(ports["endpoint"])
                servers[kind] = process = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--serve-e2e", kind],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=environment,
                )
                _pin(process.pid, server_cpus)
                line = process.stdout.readline() if process.stdout else ""
                if not line.strip().isdigit():
                    raise RuntimeError(f"the {kind} server did not start (printed {line!r})")
                ports[kind] = int(line)
            # One request each before any load: tools/call must work statelessly, without initialize.
            check_tools_call(ports["bare"], VALID_TOKEN)
            check_tools_call(ports["ours"], VALID_TOKEN)
            check_tools_call(ports["introspection"], VALID_TOKEN)
            status, _ = post_tools_call(ports["ours"], None)
            if status != 401:
                raise RuntimeError(f"the middleware answered {status} to a request without a token, not 401")
            _pin(0, wrk_cpus)
            # (label, port, token, expect 2xx); both tools/call runs send the same bytes, token included.
            targets = [
                ("tools/call without middleware", ports["bare"], VALID_TOKEN, True),
                ("tools/call with middleware", ports["ours"], VALID_TOKEN, True),
                ("tools/call, cached introspection", ports["introspection"], VALID_TOKEN, True),
                ("401 rejections (no token)", ports["ours"], None, False),
            ]
            for _, port, token, _ in targets:  # warm-up
                run_wrk(wrk, lua, port, token, 1, connections)
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in targets}
            for index in range(rounds):
                log(f"e2e: round {index + 1}/{rounds}")
                order = targets if index % 2 == 0 else targets[::-1]
                for label, port, token, expect_2xx in order:
                    run = run_wrk(wrk, lua, port, token, seconds, connections)
                    if expect_2xx and run["non_2xx"]:
                        raise RuntimeError(f"{label}: {run['non_2xx']} non-2xx responses under load")
                    if not expect_2xx and run["non_2xx"] != run["requests"]:
                        raise RuntimeError(f"{label}: only {run['non_2xx']} of {run['requests']} were refused")
                    runs[label].append(run)
            introspections = introspection_hits(ports["endpoint"])
        finally:
            _pin(0, set(cpus))
            for process in servers.values():
                process.terminate()
            for process in servers.values():
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    version = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    rps_rounds = {label: [r["rps"] for r in rs] for label, rs in runs.items()}
    ratios = [
        w / wo
        for w, wo in zip(
            rps_rounds["tools/call with middleware"], rps_rounds["tools/call without middleware"], strict=True
        )
    ]
    cached_ratios = [
        c / s
        for c, s in zip(
            rps_rounds["tools/call, cached introspection"], rps_rounds["tools/call with middleware"], strict=True
        )
    ]
    return {
        "wrk": version.stdout.split(" [")[0],
        "introspection_ratio_rounds": cached_ratios,
        "introspection_ratio": statistics.median(cached_ratios),
        "introspection_requests": sum(r["requests"] for r in runs["tools/call, cached introspection"]),
        "introspections": introspections,
        "rounds": rounds,
        "seconds": seconds,
        "connections": connections,
        "threads": 1,
        "pinned": f"servers on CPU {sorted(server_cpus)}, wrk on {sorted(wrk_cpus)}"
        if server_cpus and wrk_cpus
        else None,
        "rps": {label: statistics.median(values) for label, values in rps_rounds.items()},
        "rps_rounds": rps_rounds,
        "socket_errors": sorted({r["socket_errors"] for rs in runs.values() for r in rs if r["socket_errors"]}),
        "ratio_rounds": ratios,
        "ratio_with_without": statistics.median(ratios),  # paired per round, so drift cancels
    }


# --- report -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            cpu = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return {
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "packages": {name: version(name) for name in ("mcp", "starlette", "uvicorn")},
    }


def evaluate_targets(
    micro: dict[str, dict[str, Any]], e2e: dict[str, Any] | None, shared: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    def target(name: str, value: float | None, limit: float, at_least: bool = False) -> dict[str, Any]:
        met = value is not None and (value >= limit if at_least else value <= limit)
        verdict = "SKIP" if value is None else "PASS" if met else "MISS"
        return {"target": name, "value": value, "limit": limit, "verdict": verdict}

    bare = micro["bare"]["median_us"]
    e2e_ratio = e2e.get("ratio_with_without") if e2e else None
    introspection_ratio = e2e.get("introspection_ratio") if e2e else None
    return [
        target(
            f"valid-token overhead <= {TARGET_VALID_RATIO} x SDK stack's",
            micro["ours: valid token"]["overhead_vs_sdk"],
            TARGET_VALID_RATIO,
        ),
        target(
            f"missing-token 401 <= {TARGET_MISSING_VS_BARE} x bare time",
            micro["ours: missing token"]["median_us"] / bare,
            TARGET_MISSING_VS_BARE,
        ),
        target(
            f"excluded path within {TARGET_EXCLUDED_US} us of bare",
            abs(micro["ours: excluded path"]["overhead_us"]),
            TARGET_EXCLUDED_US,
        ),
        target(f"e2e tools/call with/without >= {TARGET_E2E_RATIO}", e2e_ratio, TARGET_E2E_RATIO, at_least=True),
        target(
            f"JWT RS256 valid token <= {TARGET_JWT_RATIO} x (static path + jwt.decode)",
            micro["JWT RS256: valid token"]["vs_static_decode"],
            TARGET_JWT_RATIO,
        ),
        target(
            f"CachedProvider hit <= {TARGET_CACHE_RATIO} x StaticTokenProvider",
            micro["ours: cached token"]["vs_against"],
            TARGET_CACHE_RATIO,
        ),
        target(
            f"operation_scopes on a 300-byte tools/call: <= +{TARGET_OPERATION_US} us",
            micro["ours: same, operation_scopes"]["minus_against_us"],
            TARGET_OPERATION_US,
        ),
        target(
            f"SDK identity (scope['user'], auth context), nothing reading it: <= +{TARGET_SDK_IDENTITY_US} us",
            micro["ours: valid, SDK identity"]["minus_against_us"],
            TARGET_SDK_IDENTITY_US,
        ),
        target(
            f"a local cache hit with a store: within +{TARGET_STORE_LOCAL_US} us of one without",
            micro["ours: cached, with a store"]["minus_against_us"] if shared else None,
            TARGET_STORE_LOCAL_US,
        ),
        target(
            f"a shared-store hit (local miss), p50 <= {TARGET_STORE_SHARED_MS} ms",
            shared["p50_ms"] if shared else None,
            TARGET_STORE_SHARED_MS,
        ),
        target(
            f"e2e tools/call, cached introspection / static >= {TARGET_INTROSPECTION_E2E}",
            introspection_ratio,
            TARGET_INTROSPECTION_E2E,
            at_least=True,
        ),
    ]


def print_report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"machine: {m['platform']}; {m['python']}; CPU {m['cpu']}; {m['cores']} cores ({m['usable_cores']} usable)")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()))
    print(f"command: {results['command']}")
    p = results["params"]
    print(f"\nper request, direct ASGI calls: {p['rounds']} rounds x {p['requests']} requests per variant")
    print(f"{'variant':<26} {'median us':>10} {'p25-p75 us':>14} {'overhead us':>12} {'/ SDK overhead':>15}")
    for name, r in results["micro"].items():
        spread = f"{r['p25_us']:.3f}-{r['p75_us']:.3f}"
        ratio = "" if r["overhead_vs_sdk"] is None else f"{r['overhead_vs_sdk']:.3f}"
        overhead = "" if name == "bare" else f"{r['overhead_us']:+.3f}"
        print(f"{name:<26} {r['median_us']:>10.3f} {spread:>14} {overhead:>12} {ratio:>15}")

    print("\nJWTProvider / (static-key path + one jwt.decode of the same token), paired per round")
    for name, r in results["micro"].items():
        if "vs_static_decode" in r:
            print(f"{name:<26} {r['vs_static_decode']:>10.3f}")

    print("\nagainst another row, paired per round: ratio and difference")
    for name, r in results["micro"].items():
        if "vs_against" in r:
            print(f"{name:<30} {r['vs_against']:>7.3f} x {r['minus_against_us']:+8.3f} us   against {r['against']}")

    print("\nmemory, valid-token requests (tracemalloc; peak includes CPython's bounded free lists)")
    print(f"{'variant':<26} {'requests':>10} {'peak bytes':>12} {'retained bytes':>15}")
    for name, r in results["memory"].items():
        print(f"{name:<26} {r['requests']:>10} {r['peak_bytes']:>12} {r['retained_bytes']:>15}")

    shared = results["shared_store"]
    if shared is None:
        print("\nshared store: not run (needs redis-server on PATH and the redis client)")
    else:
        print(
            f"\nshared store (redis-server on loopback): a local miss answered from Redis, {shared['requests']} "
            f"requests: p50 {shared['p50_ms']:.3f} ms, p90 {shared['p90_ms']:.3f} ms"
        )

    if results["builds"] is not None:
        print("\nearlier builds, in a process of their own that loads no SDK (bench_builds.py)")
        print_builds(results["builds"])

    e2e = results["e2e"]
    if e2e is None:
        print("\ne2e: not run (add --e2e)")
    elif "skipped" in e2e:
        print(f"\ne2e: skipped: {e2e['skipped']}")
    else:
        print(
            f"\ne2e: uvicorn + MCP stateless JSON on loopback, {e2e['wrk']}, -t{e2e['threads']} "
            f"-c{e2e['connections']}, {e2e['rounds']} alternating rounds x {e2e['seconds']} s"
        )
        for label, rps in e2e["rps"].items():
            rounds = ", ".join(f"{x:.0f}" for x in e2e["rps_rounds"][label])
            print(f"{label:<32} {rps:>9.0f} req/s  (rounds: {rounds})")
        spread = ", ".join(f"{x:.3f}" for x in e2e["ratio_rounds"])
        print(f"{'ratio with/without':<32} {e2e['ratio_with_without']:>9.3f}        (rounds: {spread})")
        spread = ", ".join(f"{x:.3f}" for x in e2e["introspection_ratio_rounds"])
        print(f"{'ratio cached introspection/static':<32} {e2e['introspection_ratio']:>9.3f}        (rounds: {spread})")
        print(
            f"introspection endpoint (~{INTROSPECTION_DELAY * 1000:.0f} ms per answer): {e2e['introspections']} "
            f"introspections for {e2e['introspection_requests']} tools/call requests with one token (ttl 300 s)"
        )
        if e2e["pinned"]:
            print(f"pinned: {e2e['pinned']}")
        if e2e["socket_errors"]:
            print(f"wrk socket errors: {'; '.join(e2e['socket_errors'])}")

    print("\ntargets (informational; exit code 0 either way)")
    for t in results["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        print(f"  {t['verdict']:<4}  {t['target']}: {value}")
    print(f"\ntook {results['seconds']:.1f} s (after imports)")


# --- main ---------------------------------------------------------------------------------------


class LocalRedis:
    """A redis-server of our own on a free loopback port, for the shared-store rows; None without one."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="bench-redis-")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            command, cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        self.stop()
        raise SystemExit("bench_mcp_bearer: redis-server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


async def shared_hits(store: RedisStore, requests: int) -> dict[str, Any]:
    """A verdict another replica kept: each request misses its local cache and is answered from Redis."""
    provider = StaticTokenProvider({VALID_TOKEN: CLAIMS})
    writer = CachedProvider(provider, store=store)
    assert await writer.verify_token(VALID_TOKEN) is not None  # kept in Redis by "another replica"
    reader = CachedProvider(FailingProvider(), store=store)  # a replica whose own provider is never asked
    times = []
    for _ in range(requests):
        reader._entries.clear()  # this replica's own cache only (clear() would reach every replica)
        start = time.perf_counter_ns()
        access = await reader.verify_token(VALID_TOKEN)
        times.append(time.perf_counter_ns() - start)
        assert access is not None
    times.sort()
    return {
        "requests": requests,
        "p50_ms": times[len(times) // 2] / 1e6,
        "p90_ms": times[len(times) * 9 // 10] / 1e6,
    }


class FailingProvider(BearerAuthProvider):
    async def verify_token(self, token: str) -> AccessToken | None:
        raise AssertionError("the shared verdict should have answered")


async def run_in_process(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[dict[str, Any], ...]:
    redis = LocalRedis() if shutil.which("redis-server") and importlib.util.find_spec("redis") else None
    store = RedisStore(f"redis://127.0.0.1:{redis.port}/0") if redis else None
    try:
        return await measure_all(args, log, store)
    finally:
        if store is not None:
            store.close()
        if redis is not None:
            redis.stop()


async def measure_all(
    args: argparse.Namespace, log: Callable[[str], None], store: RedisStore | None
) -> tuple[dict[str, Any], ...]:
    if store is not None:
        assert await store.check(AccessToken("", {})) is False  # the reader's first copy of the deny list
    variants = build_variants(store)
    gc.collect()
    gc.freeze()  # set-up objects out of the collector's way: collections then cost the same in every variant
    await run_micro(variants, args.requests, args.rounds, log)
    micro = summarize_micro(variants)
    log("memory")
    by_name = {v.name: v for v in variants}
    memory = {}
    for name in ("bare", "ours: valid token", "SDK stack: valid token"):
        memory[name] = await measure_memory(by_name[name].app, by_name[name].template, args.memory_requests)
    shared = None
    if store is not None:
        log("shared-store hits")
        shared = await shared_hits(store, 200 if args.quick else 2000)
    return micro, memory, shared


def run_builds(refs: list[str], quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Earlier builds against this checkout, from ``bench_builds.py`` in a process that loads no SDK."""
    log(f"builds: {', '.join(refs)} against this checkout (bench_builds.py)")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_builds.py")
    rounds = ["--rounds", "10", "--requests", "500"] if quick else ["--rounds", "150"]
    command = [sys.executable, script, "--json", *rounds, *refs]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer rounds and requests (CI smoke)")
    parser.add_argument("--e2e", action="store_true", help="also run uvicorn + wrk end to end (needs wrk on PATH)")
    parser.add_argument("--json", action="store_true", help="print machine-readable results instead of tables")
    parser.add_argument("--rounds", type=int, help="micro rounds (default 25, quick 5)")
    parser.add_argument("--requests", type=int, help="requests per variant per round (default 1000, quick 200)")
    parser.add_argument("--memory-requests", type=int, help="requests per memory run (default 100000, quick 5000)")
    parser.add_argument("--e2e-rounds", type=int, help="e2e rounds (default 6, quick 2)")
    parser.add_argument("--e2e-seconds", type=int, help="whole seconds per wrk run (default 2, quick 1)")
    parser.add_argument("--e2e-connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument(
        "--baseline", metavar="REF", action="append", help="also time mcp_bearer.py as it was at this git ref"
    )
    parser.add_argument("--serve-e2e", choices=("bare", "ours", "introspection", "endpoint"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_e2e == "endpoint":
        serve_introspection()
        return
    if args.serve_e2e:
        serve(args.serve_e2e)
        return
    defaults: dict[str, tuple[int, int]] = {"rounds": (25, 5), "requests": (1000, 200)}
    defaults |= {"memory_requests": (100_000, 5000), "e2e_rounds": (6, 2), "e2e_seconds": (2, 1)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")

    def log(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    micro, memory, shared = asyncio.run(run_in_process(args, log))
    e2e = run_e2e(args.e2e_rounds, args.e2e_seconds, args.e2e_connections, log) if args.e2e else None
    builds = run_builds(args.baseline, args.quick, log) if args.baseline else None
    results: dict[str, Any] = {
        "machine": machine(),
        "command": f"cd {shlex.quote(os.getcwd())} && {shlex.join([sys.executable, *sys.argv])}",
        "params": {
            "rounds": args.rounds,
            "requests": args.requests,
            "memory_requests": args.memory_requests,
            "quick": args.quick,
        },
        "micro": micro,
        "memory": memory,
        "shared_store": shared,
        "e2e": e2e,
        "builds": builds,
    }
    results["targets"] = evaluate_targets(micro, e2e, shared)
    results["seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_report(results)


if __name__ == "__main__":
    main()
