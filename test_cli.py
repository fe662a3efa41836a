"""The command line, as users start it: python -m mcp_bearer, the mcp-bearer console script, or
main() from their own code; each run in a subprocess on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mcp_bearer
from support import (
    ACTIVE,
    ALICE_1,
    AUDIENCE,
    BOB,
    CLIENT_ID,
    CLIENT_SECRET,
    INACTIVE,
    INITIALIZE,
    ISSUER,
    MCP_MAJOR,
    MCP_POST_HEADERS,
    REPO,
    SECRETS,
    TOKENS,
    IntrospectionEndpoint,
    JWKSEndpoint,
    call_json,
    fingerprint,
    mcp_session,
    raw_request,
    sign,
)

# The ways a user starts the command line; each must give one mcp_bearer module, the one their server imports.
PYTHON_M = (sys.executable, "-m", "mcp_bearer")
# pip installs the console script next to the interpreter; CI installs the package, so it must be there.
CONSOLE_SCRIPT = (os.path.join(os.path.dirname(sys.executable), "mcp-bearer"),)
IMPORTED_MAIN = (sys.executable, "-c", "import sys, mcp_bearer; mcp_bearer.main(sys.argv[1:])")


@contextlib.contextmanager
def cli_server(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: str = REPO,
    command: tuple[str, ...] = PYTHON_M,
    stderr: list[str] | None = None,
) -> Iterator[tuple[str, list[str]]]:
    """Run ``COMMAND --port 0 ARGS``; yield (base URL, stdout lines before 'Serving'); stop it.

    ``stderr``, if given, receives the lines the server wrote there, once it has stopped.
    """
    process = subprocess.Popen(
        [*command, "--port", "0", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Serving "):
                break
        else:
            pytest.fail(f"server exited: {process.wait()} {process.stderr.read() if process.stderr else ''}")
        url = lines[-1].split()[1]
        yield url.removesuffix("/mcp"), lines
    finally:
        process.terminate()
        process.wait(20)
        if stderr is not None and process.stderr is not None:
            stderr.extend(process.stderr.read().splitlines())


def run_cli(
    *args: str, cwd: str = REPO, command: tuple[str, ...] = PYTHON_M, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": REPO, "MCP_BEARER_TOKENS": "", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- the demo server --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_cli_demo_prints_one_token_and_serves_whoami_with_it() -> None:
    with cli_server(env={"MCP_BEARER_TOKENS": ""}) as (base, lines):
        token = lines[0].removeprefix("Bearer token: ")
        SECRETS.add(token)
        config = json.loads("\n".join(lines[2:-1]))
        assert config == {
            "mcpServers": {"demo": {"url": base + "/mcp", "headers": {"Authorization": f"Bearer {token}"}}}
        }
        assert raw_request(base, "POST", "/mcp", MCP_POST_HEADERS, INITIALIZE)[0] == 401
        async with mcp_session(base + "/mcp", token) as (session, _):
            assert await call_json(session, "whoami") == {"sub": "demo-user"}


@pytest.mark.slow
@pytest.mark.anyio
async def test_cli_demo_takes_tokens_from_the_environment() -> None:
    with cli_server(env={"MCP_BEARER_TOKENS": f"{BOB}, {ALICE_1}"}) as (base, lines):
        assert not any("Bearer" in line for line in lines)  # nothing generated, nothing printed
        async with mcp_session(base + "/mcp", ALICE_1) as (session, _):
            assert await call_json(session, "whoami") == {"sub": "user-2"}
        assert raw_request(base, "POST", "/mcp", {"Authorization": "Bearer sk-nobody"})[0] == 401


# --- serving the user's own app: one mcp_bearer module for the server and its tools -----


@pytest.mark.slow
def test_cli_serves_any_asgi_app_with_every_option(tmp_path: Path) -> None:
    (tmp_path / "plain_app.py").write_text(
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n"
        "        return\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': scope['path'].encode()})\n"
    )
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({BOB: {"sub": "bob", "scopes": ["read", "write"]}, ALICE_1: {"sub": "alice"}}))
    args = ["plain_app:app", "--tokens-file", str(tokens), "--exclude", "/status", "--required-scope", "write"]
    args += ["--resource", "https://mcp.example.com/mcp", "--authorization-server", "https://auth.example.com"]
    with cli_server(*args, cwd=str(tmp_path)) as (base, lines):
        assert lines == [f"Serving {base}/mcp behind bearer-token authentication (Ctrl+C to stop)"]
        assert raw_request(base, "GET", "/x", {"Authorization": f"Bearer {BOB}"})[2] == b"/x"
        assert raw_request(base, "GET", "/x", {"Authorization": f"Bearer {ALICE_1}"})[0] == 403
        assert raw_request(base, "GET", "/status")[0] == 200
        assert raw_request(base, "GET", "/health")[0] == 401  # --exclude replaced the defaults
        status, _, body = raw_request(base, "GET", "/.well-known/oauth-protected-resource/mcp")
        assert status == 200 and json.loads(body)["authorization_servers"] == ["https://auth.example.com"]
        assert (
            'resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource/mcp"'
            in (raw_request(base, "GET", "/x")[1]["www-authenticate"])
        )


# The user's own module imports mcp_bearer; if the command line ran a second copy of the module as
# __main__, the middleware would set one context variable and the tools read another: every caller None.
USER_SERVER = """\
import asyncio
import hashlib

from mcp_bearer import get_access_token
{server_import}

server = Server("user")


def caller() -> dict:
    token = get_access_token()
    if token is None:
        return {{"token": None, "claims": None}}
    # A digest, not the token: tool results reach DEBUG logs.
    return {{"token": hashlib.sha256(token.token.encode()).hexdigest()[:16], "claims": token.claims}}


@server.tool()
def whoami() -> dict:
    return caller()


@server.tool()
async def whoami_async() -> dict:
    await asyncio.sleep(0)
    return caller()
"""
SERVER_IMPORT = {
    2: "from mcp.server.mcpserver import MCPServer as Server",
    1: "from mcp.server.fastmcp import FastMCP as Server",
}
ENTRY_POINTS = pytest.mark.parametrize(
    "command", [PYTHON_M, CONSOLE_SCRIPT, IMPORTED_MAIN], ids=["python-m", "console-script", "imported-main"]
)


@pytest.mark.slow
@pytest.mark.anyio
@ENTRY_POINTS
async def test_cli_tools_of_a_user_module_see_their_own_caller(command: tuple[str, ...], tmp_path: Path) -> None:
    (tmp_path / "user_server.py").write_text(USER_SERVER.format(server_import=SERVER_IMPORT[MCP_MAJOR]))
    (tmp_path / "tokens.json").write_text(json.dumps({ALICE_1: TOKENS[ALICE_1], BOB: TOKENS[BOB]}))
    args = ("user_server:server", "--tokens-file", "tokens.json")
    with cli_server(*args, cwd=str(tmp_path), command=command) as (base, _):
        async with mcp_session(base + "/mcp", ALICE_1) as (alice, _), mcp_session(base + "/mcp", BOB) as (bob, _):
            for tool in ("whoami", "whoami_async", "whoami"):
                for session, token in ((alice, ALICE_1), (bob, BOB)):
                    expected = {"token": fingerprint(token), "claims": TOKENS[token]}
                    assert await call_json(session, tool) == expected, (tool, TOKENS[token]["sub"])


def test_cli_listener_lets_asyncio_turn_nagle_off() -> None:
    """Found by the benchmark: with create_server's protocol 0, each CLI response waited ~40 ms."""

    async def accepted_nodelay() -> int:
        nodelay: list[int] = []

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nodelay.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        listener = mcp_bearer._listen("127.0.0.1", 0)  # the command line's own listener
        async with await asyncio.start_server(on_connect, sock=listener):
            _, writer = await asyncio.open_connection(*listener.getsockname())
            while not nodelay:
                await asyncio.sleep(0.01)
            writer.close()
        return nodelay[0]

    assert asyncio.run(accepted_nodelay()) != 0


# --- bad input: one line on stderr, exit code 2, no secret echoed -----------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        yield taken.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens-file", "/nonexistent/tokens.json"], "--tokens-file: cannot read '/nonexistent/tokens.json'"),
        (["--tokens-file", "{tmp}"], "--tokens-file: cannot read"),  # a directory
        (["--tokens-file", "{tmp}/bad.json"], "is not valid JSON"),
        (["--tokens-file", "{tmp}/list.json"], "must hold a JSON object: {{token: claims}}, or a keys file"),
        (["--tokens-file", "{tmp}/flat.json"], "flat.json: claims of token #1 must be a mapping"),
        (["--tokens-file", "{tmp}/badkey.json"], "badkey.json: token #2 is not a non-empty RFC 6750 token"),
        (["no_such_module_xyz:app"], "cannot import module 'no_such_module_xyz'"),
        (["json:no_such_app"], "module 'json' has no attribute 'no_such_app'"),
        (["json"], "must look like MODULE:ATTR"),
        (["json:__name__"], "neither an ASGI app nor an MCP server"),
        (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}"),
        (["--port", "http"], "argument --port: invalid int value"),
        (["--resource", "not-a-url"], "--resource must be an absolute http(s) URL"),
        (["--required-scope", "two words"], "is not an RFC 6749 scope-token"),
        (["--exclude", "health"], "--exclude entries must start with '/'"),  # the flag the user typed
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_cli_bad_input_is_one_stderr_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path, busy_port: int
) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text(json.dumps([BOB]))
    (tmp_path / "flat.json").write_text(json.dumps({BOB: "bob"}))
    (tmp_path / "badkey.json").write_text(json.dumps({BOB: {}, f"{BOB} x": {}}))
    args = [a.format(tmp=tmp_path, busy=busy_port) for a in args]
    result = run_cli(*args, "--port", str(busy_port)) if "--port" not in args else run_cli(*args)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcp_bearer: error: "), result.stderr
    assert message.format(busy=busy_port) in lines[0]
    assert BOB not in result.stderr and BOB not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "prog"),
    [(PYTHON_M, "python -m mcp_bearer"), (CONSOLE_SCRIPT, "mcp-bearer"), (IMPORTED_MAIN, "python -m mcp_bearer")],
    ids=["python-m", "console-script", "imported-main"],
)
def test_cli_help_explains_and_every_entry_point_refuses_alike(command: tuple[str, ...], prog: str) -> None:
    result = run_cli("--help", command=command)
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: {prog} "), result.stdout  # the name the user typed
    for option in ("--tokens-file", "--exclude", "--required-scope", "--resource", "--authorization-server"):
        assert option in result.stdout
    assert "MCP_BEARER_TOKENS" in result.stdout
    result = run_cli("--no-such-option", command=command)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["mcp_bearer: error: unrecognized arguments: --no-such-option"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jwks-url", "https://a.example/k", "--issuer", "x"], "--jwks-url and --jwt-key-file need --issuer and"),
        (["--jwks-url", "https://a.example/k", "--audience", "x"], "--jwks-url and --jwt-key-file need --issuer and"),
        (["--issuer", "x", "--audience", "y"], "--issuer, --algorithm, --leeway and the --jwks-* options need"),
        (["--audience", "y"], "--audience needs --jwks-url, --jwt-key-file or --introspection-url"),
        (["--introspection-url", "https://a.example/i"], "needs --client-id and the client secret in $MCP_BEARER"),
        (["--introspection-url", "https://a.example/i", "--client-id", "c", "--no-secret"], "client secret in $MCP"),
        (["--client-id", "c"], "--client-id needs --introspection-url"),
        (["--introspection-url", "http://a.example/i", "--client-id", "c"], "url must use https://"),
        (
            ["--introspection-url", "https://a.example/i", "--client-id", "c", "--audience", "a", "--audience", "b"],
            "at most one --audience",
        ),
        (["--introspection-url", "https://a.example/i", "--client-id", "c", "--tokens-file", "/nonexistent"], "read"),
        (["--cache-ttl", "0"], "ttl must be a finite number of seconds, > 0"),
        (["--cache-ttl", "soon"], "argument --cache-ttl: invalid float value"),
        (["--jwks-url", "http://a.example/k", "--issuer", "x", "--audience", "y"], "--jwks-url must use https://"),
        (["--jwks-url", "https://a.example/k", "--issuer", "x", "--audience", "y", "--algorithm", "none"], "'none'"),
        (["--jwks-url", "https://a.example/k", "--issuer", "x", "--audience", "y", "--algorithm", "HS256"], "HMAC"),
    ],
)
def test_cli_bad_token_sources_are_one_stderr_line_and_exit_2(args: list[str], message: str) -> None:
    """The client secret comes from the environment only: never an argument, which shows in ps."""
    secret = {} if "--no-secret" in args else {"MCP_BEARER_CLIENT_SECRET": "cs-Zr8Lq3Vw"}
    result = run_cli(*[a for a in args if a != "--no-secret"], env={"MCP_BEARER_CLIENT_SECRET": "", **secret})
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcp_bearer: error: ") and message in lines[0], result.stderr
    assert "cs-Zr8Lq3Vw" not in result.stderr + result.stdout


# --- token services from the command line: JWKS, introspection, cache, audit trail ------


@pytest.mark.slow
def test_cli_jwks_url_protects_an_app_with_jwt(jwks: JWKSEndpoint) -> None:
    args = ["--jwks-url", jwks.url, "--issuer", ISSUER, "--audience", AUDIENCE, "--audience", "api://x"]
    with cli_server(*args, "--algorithm", "ES256", "--algorithm", "RS256") as (base, lines):
        assert lines == [f"Serving {base}/mcp behind bearer-token authentication (Ctrl+C to stop)"]  # no token printed
        auth = {"Authorization": f"Bearer {sign('ES256', 'ec1', 'ec-1', aud='api://x')}", **MCP_POST_HEADERS}
        assert raw_request(base, "POST", "/mcp", auth, INITIALIZE)[0] == 200
        assert raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {sign('PS256')}"})[0] == 401
        assert raw_request(base, "GET", "/health")[0] != 401


@pytest.mark.slow
def test_cli_chains_api_keys_and_cached_introspection_and_prints_the_audit_trail(
    introspection: IntrospectionEndpoint, tmp_path: Path
) -> None:
    """The README's command: API keys first, opaque tokens introspected once per TTL, one audit line each."""
    (tmp_path / "plain_app.py").write_text(
        "async def app(scope, receive, send):\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    sub = scope['state']['access_token'].claims['sub']\n"
        "    await send({'type': 'http.response.body', 'body': sub.encode()})\n"
    )
    (tmp_path / "keys.json").write_text(json.dumps({BOB: {"sub": "bob"}}))
    args = ["plain_app:app", "--tokens-file", "keys.json", "--introspection-url", introspection.url]
    args += ["--client-id", CLIENT_ID, "--cache-ttl", "60", "--audit"]
    stderr: list[str] = []
    with cli_server(*args, cwd=str(tmp_path), env={"MCP_BEARER_CLIENT_SECRET": CLIENT_SECRET}, stderr=stderr) as (
        base,
        _,
    ):
        assert raw_request(base, "GET", "/x", {"Authorization": f"Bearer {BOB}"})[2] == b"bob"
        assert introspection.introspections == []  # an API key never reaches the token service
        for _ in range(3):
            assert raw_request(base, "GET", "/x", {"Authorization": f"Bearer {ACTIVE}"})[2] == b"dana"
        assert len(introspection.introspections) == 1  # the cache answered the other two
        assert raw_request(base, "GET", "/x", {"Authorization": f"Bearer {INACTIVE}"})[0] == 401
        assert raw_request(base, "GET", "/x")[0] == 401
    trail = [line for line in stderr if " mcp_bearer.audit " in line]
    outcomes = [line.split(" mcp_bearer.audit ", 1)[1].split(":", 1)[0] for line in trail]
    assert outcomes == ["allowed"] * 4 + ["401 invalid_token", "401 unauthorized"], stderr
    # The principals sessions are bound to: the API keys' own issuer for bob, the IdP's (or its
    # provider's place in the chain) for dana; quoted, as everything a client or an IdP supplies.
    assert """principal '["mcp_bearer:api-key", "bob"]'""" in trail[0] and """"dana"]'""" in trail[1]
    assert "reason 'inactive (introspection)'" in trail[4]
    assert [line for line in stderr if "holds keys in plain text" in line]  # warned: keys.json is plain
    assert not [line for line in stderr if any(secret in line for secret in (BOB, ACTIVE, INACTIVE, CLIENT_SECRET))]
