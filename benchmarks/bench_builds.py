"""Builds of mcp_bearer.py side by side: what a change costs on the valid-token and 401 paths.

Each git REF's ``mcp_bearer.py`` and this checkout's are timed in one process, in one event loop, on
the same requests as ``bench_mcp_bearer.py``'s micro rows (``BearerAuthMiddleware`` +
``StaticTokenProvider``, its defaults): each round runs N requests of every build in turn, start
rotated per round, and a build's difference to this checkout is the median of the per-round
differences, with their p25-p75.

This process imports the standard library and the builds, nothing else, on purpose. In a process that
has loaded the MCP SDK (as ``bench_mcp_bearer.py`` must, for its SDK-stack rows), two builds that
differ by one test of an attribute that is None have timed up to 0.9 us apart on the valid-token row, the same
way in every run, and the same two time alike here: a comparison between builds made there measures
where the code landed as much as what it does. ``bench_mcp_bearer.py --baseline REF`` runs this script.

Run from the repository root::

    python benchmarks/bench_builds.py dbb3b4e 00ab1c2       # those commits against this checkout
    python benchmarks/bench_builds.py --rounds 60 HEAD~1     # more rounds: a tighter p25-p75
    python benchmarks/bench_builds.py --json dbb3b4e         # machine-readable, for bench_mcp_bearer.py

It also holds the requests and the trivial app both scripts time, so that they time the same thing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Callable[[Message], Awaitable[None]]], Awaitable[None]]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALID_TOKEN = secrets.token_urlsafe(32)
CLAIMS: dict[str, Any] = {"sub": "bench-user", "scopes": ["mcp"]}
MCP_HEADERS = {
    "content-type": "application/json",
    "accept": "application/json, text/event-stream",
    "mcp-protocol-version": "2025-06-18",
}


async def hello_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """The trivial app: 200, ``ok``."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def make_scope(path: str, token: str | None) -> dict[str, Any]:
    """A uvicorn-like scope for ``POST path`` with an MCP client's usual headers."""
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"python-httpx/0.28.1"),
        (b"accept-encoding", b"gzip, deflate"),
        (b"connection", b"keep-alive"),
        *((name.encode(), value.encode()) for name, value in MCP_HEADERS.items()),
        (b"content-length", b"2"),
    ]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 54321),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "state": {},
    }


_REQUEST_MESSAGE: Message = {"type": "http.request", "body": b"{}", "more_body": False}


async def receive_request() -> Message:
    return _REQUEST_MESSAGE


# A tools/call as a 2025-11-25 client posts it, padded to 300 bytes; rules as a server with
# read, write and admin tools would have them.
_TOOLS_CALL_BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "add", "arguments": {"a": 1, "b": 2, "note": ""}, "_meta": {"progressToken": 7}},
    }
).encode()
_TOOLS_CALL_BODY = _TOOLS_CALL_BODY.replace(b'"note": ""', b'"note": "' + b"x" * (300 - len(_TOOLS_CALL_BODY)) + b'"')
assert len(_TOOLS_CALL_BODY) == 300
_TOOLS_CALL_MESSAGE: Message = {"type": "http.request", "body": _TOOLS_CALL_BODY, "more_body": False}
OPERATION_SCOPES = {"tools/call add": ["mcp"], "tools/call delete_*": ["projects:delete"], "resources/read": ["mcp"]}


async def receive_tools_call() -> Message:
    return _TOOLS_CALL_MESSAGE


async def discard(message: Message) -> None:
    return None


async def timed_batch(app: ASGIApp, template: dict[str, Any], n: int, receive: Receive | None = None) -> int:
    """``n`` requests, each on a fresh copy of the scope (as a server builds one per request); elapsed ns."""
    copy = template.copy
    receive, send = receive or receive_request, discard
    start = time.perf_counter_ns()
    for _ in range(n):
        scope = copy()
        scope["state"] = {}
        await app(scope, receive, send)
    return time.perf_counter_ns() - start


def build_module(ref: str | None) -> Any:
    """``mcp_bearer.py`` as it was at git ``ref`` (None: as it is in this checkout), imported under its own name."""
    if ref is None:
        with open(os.path.join(ROOT, "mcp_bearer.py"), encoding="utf-8") as file:
            source = file.read()
    else:
        command = ["git", "show", f"{ref}:mcp_bearer.py"]
        source = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    name = "mcp_bearer_" + (ref or "checkout").replace("~", "_").replace("^", "_").replace(".", "_")
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{ref or 'checkout'}:mcp_bearer.py", "exec"), module.__dict__)
    return module


def guarded(module: Any) -> ASGIApp:
    """The module's middleware with its defaults around the trivial app (the SDK bridge off where there is one)."""
    parameters = module.BearerAuthMiddleware.__init__.__code__.co_varnames
    options = {"sdk_identity": False} if "sdk_identity" in parameters else {}
    provider = module.StaticTokenProvider({VALID_TOKEN: CLAIMS})
    return module.BearerAuthMiddleware(hello_app, provider, **options)  # type: ignore[no-any-return]


async def compare(refs: list[str], requests: int, rounds: int) -> dict[str, Any]:
    cases = {"valid": (make_scope("/mcp", VALID_TOKEN), 200), "missing": (make_scope("/mcp", None), 401)}
    builds = {"checkout": guarded(build_module(None)), **{ref: guarded(build_module(ref)) for ref in refs}}
    rows = [(build, case) for build in builds for case in cases]
    for build, case in rows:  # refuse to time a build that answers otherwise
        statuses: list[int] = []

        async def record(message: Message, statuses: list[int] = statuses) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await builds[build](dict(cases[case][0], state={}), receive_request, record)
        if statuses != [cases[case][1]]:
            raise SystemExit(f"bench_builds: {build} answered {statuses} to the {case} request")
    times: dict[tuple[str, str], list[float]] = {row: [] for row in rows}
    gc.collect()
    gc.freeze()
    for index in range(rounds + 1):  # the first round warms up and is not recorded
        shift = index % len(rows)
        for build, case in rows[shift:] + rows[:shift]:
            elapsed = await timed_batch(builds[build], cases[case][0], requests)
            if index:
                times[(build, case)].append(elapsed / requests / 1000)
    results: dict[str, Any] = {"requests": requests, "rounds": rounds, "python": sys.version.split()[0], "rows": {}}
    for build, case in rows:
        row: dict[str, Any] = {"median_us": statistics.median(times[(build, case)])}
        if build != "checkout":
            differences = [t - c for t, c in zip(times[(build, case)], times[("checkout", case)], strict=True)]
            quartiles = statistics.quantiles(differences, n=4)
            row.update(minus_checkout_us=statistics.median(differences), p25_us=quartiles[0], p75_us=quartiles[2])
        results["rows"][f"{build}: {case}"] = row
    return results


def report(results: dict[str, Any]) -> None:
    rounds, requests = results["rounds"], results["requests"]
    print(f"builds side by side, Python {results['python']}: {rounds} rounds x {requests} requests")
    print(f"{'build: case':<28} {'median us':>10} {'- checkout us':>14} {'p25..p75 us':>16}")
    for name, row in results["rows"].items():
        if "minus_checkout_us" in row:
            spread = f"{row['p25_us']:+.3f}..{row['p75_us']:+.3f}"
            print(f"{name:<28} {row['median_us']:>10.3f} {row['minus_checkout_us']:>+14.3f} {spread:>16}")
        else:
            print(f"{name:<28} {row['median_us']:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("refs", nargs="+", metavar="REF", help="git refs whose mcp_bearer.py to time against this")
    parser.add_argument("--rounds", type=int, default=40, help="rounds (default 40)")
    parser.add_argument("--requests", type=int, default=3000, help="requests per build and case, per round")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results = asyncio.run(compare(args.refs, args.requests, args.rounds))
    if args.json:
        print(json.dumps(results))
    else:
        report(results)


if __name__ == "__main__":
    main()
