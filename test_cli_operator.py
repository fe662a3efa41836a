"""The command line as an operator runs it in production, and why each token was refused.

Served remotely (``--host 0.0.0.0`` and the SDK's DNS-rebinding guard, ``--allowed-host``), its audit
trail printed once, a wrapped middleware refused, install hints that name real packages, errors in the
words of the flags, ``--version``, the JWT options end to end, no OAuth pretended without ``--resource``,
a banner that says what is protected; and the reason behind every refusal, for operators only (one
DEBUG record, the audit trail), never the token. Each command runs in a subprocess on a free port with a
user's own module written to tmp_path, as a user starts it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives import serialization

import mcp_bearer
from mcp_bearer import (
    AccessToken,
    BearerAuthProvider,
    JWTProvider,
    ProviderChain,
    StaticTokenProvider,
    new_api_key,
)
from support import (
    AUD_OTHER,
    AUDIENCE,
    BOB,
    CHALLENGE_INVALID,
    CLIENT_ID,
    CLIENT_SECRET,
    HMAC_SECRET,
    INACTIVE,
    INITIALIZE,
    INVALID_TOKEN,
    ISSUER,
    MCP_MAJOR,
    MCP_POST_HEADERS,
    REPO,
    RESOURCE,
    SECRETS,
    Harness,
    IntrospectionEndpoint,
    JWKSEndpoint,
    bearer,
    call_json,
    fingerprint,
    httpx,
    introspector,
    mcp_bearer_log,
    private_key,
    raw_request,
    sign,
    tool_text,
)
from test_cli import CONSOLE_SCRIPT, IMPORTED_MAIN, PYTHON_M, SERVER_IMPORT, USER_SERVER

ENTRY_POINTS = pytest.mark.parametrize(
    "command", [PYTHON_M, CONSOLE_SCRIPT, IMPORTED_MAIN], ids=["python-m", "console-script", "imported-main"]
)


# --- the command line, run as a user runs it ------------------------------------------------


@dataclasses.dataclass
class Served:
    """A running command line: its base URL (on 127.0.0.1, whatever --host said) and everything it printed."""

    base: str
    process: subprocess.Popen[str]
    stdout: list[str]
    stderr: list[str]

    def banner(self) -> list[str]:
        """The startup banner: printed and flushed in one write, before the server accepts anything.

        The reader thread is handed its lines one by one, all of them already read: done once they stop coming.
        """
        deadline, seen = time.monotonic() + 5, -1
        while len(self.stdout) != seen and time.monotonic() < deadline:
            seen = len(self.stdout)
            time.sleep(0.3)
        start = next(n for n, line in enumerate(self.stdout) if line.startswith("Serving "))
        return self.stdout[start:]


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO, "MCP_BEARER_TOKENS": "", "MCP_BEARER_CLIENT_SECRET": "", **(env or {})}


@contextlib.contextmanager
def served(
    *args: str, cwd: Path | str = REPO, command: tuple[str, ...] = PYTHON_M, env: dict[str, str] | None = None
) -> Iterator[Served]:
    """``COMMAND --port 0 ARGS`` in a subprocess; both streams read as they come; stopped on the way out.

    What it printed is checked for every secret of the suite once it has stopped.
    """
    process = subprocess.Popen(
        [*command, "--port", "0", *args],
        cwd=str(cwd),
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout: list[str] = []
    stderr: list[str] = []
    serving = threading.Event()

    def pump(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if line.startswith("Serving "):
                serving.set()
        serving.set()  # the process has ended

    pumps = [
        threading.Thread(target=pump, args=(s, lines), daemon=True)
        for s, lines in ((process.stdout, stdout), (process.stderr, stderr))
    ]
    for thread in pumps:
        thread.start()
    try:
        serving.wait(60)
        line = next((line for line in stdout if line.startswith("Serving ")), None)
        if line is None:
            process.wait(20)
            for thread in pumps:
                thread.join(20)
            pytest.fail(f"the command line did not serve (exit {process.returncode}): {stderr}")
        port = line.split()[1].removesuffix("/mcp").rsplit(":", 1)[1]
        yield Served(f"http://127.0.0.1:{port}", process, stdout, stderr)
    finally:
        process.terminate()
        process.wait(20)
        for thread in pumps:
            thread.join(20)
    printed = "\n".join(stdout + stderr)
    assert not [s[:8] for s in SECRETS if s in printed], "the command line printed a secret"


def run(
    *args: str, cwd: Path | str = REPO, command: tuple[str, ...] = PYTHON_M, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, *args], cwd=str(cwd), env=cli_env(env), capture_output=True, text=True, timeout=30)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Bad input on the command line: exit 2 and exactly one line on stderr, the message after the prefix."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr, result.stdout[:500])
    assert lines[0].startswith("mcp_bearer: error: ")
    return lines[0].removeprefix("mcp_bearer: error: ")


def user_module(directory: Path, name: str = "user_server", prelude: str = "") -> str:
    """A user's own MCP server module (whoami tools that see their caller); returns its MODULE:ATTR."""
    (directory / f"{name}.py").write_text(prelude + USER_SERVER.format(server_import=SERVER_IMPORT[MCP_MAJOR]))
    return f"{name}:server"


def tokens_file(directory: Path, tokens: dict[str, dict[str, Any]]) -> str:
    """A keys file (digests only, mode 0600) for these tokens: the command line has nothing to warn about."""
    path = directory / "keys.json"
    records = [{"sha256": mcp_bearer._digest(token).hex(), "claims": claims} for token, claims in tokens.items()]
    path.write_text(json.dumps({"keys": records}))
    path.chmod(0o600)
    return str(path)


def post_initialize(base: str, token: str | None, **headers: str) -> int:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return raw_request(base, "POST", "/mcp", {**MCP_POST_HEADERS, **auth, **headers}, INITIALIZE)[0]


async def whoami_on_both_generations(url: str, token: str, headers: dict[str, str] | None = None) -> list[Any]:
    """The whoami tool, called with the 2025-11-25 handshake (ClientSession) and, on mcp 2.x, with
    ``mcp.client.Client`` speaking 2026-07-28; ``headers`` go on every request (a Host, say)."""
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    sent = {"Authorization": f"Bearer {token}", **(headers or {})}
    seen = []
    async with (
        httpx.AsyncClient(headers=sent, timeout=30) as client,
        streamable_http_client(url, http_client=client) as streams,
        ClientSession(streams[0], streams[1]) as session,
    ):
        await session.initialize()
        seen.append(await call_json(session, "whoami"))
    if MCP_MAJOR == 2:
        from mcp.client import Client

        async with (
            httpx.AsyncClient(headers=sent, timeout=30) as client,
            Client(streamable_http_client(url, http_client=client)) as modern,
        ):
            assert modern.protocol_version == "2026-07-28"
            seen.append(json.loads(tool_text(await modern.call_tool("whoami", {}))))
    return seen


def as_seen(token: str, claims: dict[str, Any]) -> dict[str, Any]:
    return {"token": fingerprint(token), "claims": claims}


# --- served remotely: --host 0.0.0.0 and the SDK's DNS-rebinding guard ---------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_cli_on_all_interfaces_serves_requests_addressed_by_any_name(tmp_path: Path) -> None:
    """Behind a proxy or on a LAN, requests name the server's DNS name or address, never localhost:
    the SDK's guard, built for 127.0.0.1, would answer each 421."""
    tokens = tokens_file(tmp_path, {BOB: {"sub": "bob"}})
    with served(user_module(tmp_path), "--tokens-file", tokens, "--host", "0.0.0.0", cwd=tmp_path) as server:
        assert server.banner()[0].startswith("Serving http://0.0.0.0:")
        for host in ("mcp.example.com", "mcp.example.com:8443", "192.0.2.10:8000", "[2001:db8::1]:8000", "localhost"):
            assert post_initialize(server.base, BOB, Host=host) == 200, host
        assert post_initialize(server.base, None, Host="mcp.example.com") == 401  # still behind the middleware
        seen = await whoami_on_both_generations(server.base + "/mcp", BOB, {"Host": "mcp.example.com"})
        assert seen == [as_seen(BOB, {"sub": "bob"})] * len(seen) and seen


@pytest.mark.slow
def test_cli_allowed_hosts_configure_the_sdks_guard_and_loopback_keeps_it(tmp_path: Path) -> None:
    """DNS rebinding (MCP transports, Security Warning): a listed Host passes, any other gets 421."""
    tokens = tokens_file(tmp_path, {BOB: {"sub": "bob"}})
    module = user_module(tmp_path)
    listed = ["--allowed-host", "mcp.example.com", "--allowed-host", "10.0.0.5:8000"]
    with served(module, "--tokens-file", tokens, "--host", "0.0.0.0", *listed, cwd=tmp_path) as server:
        for host in ("mcp.example.com", "mcp.example.com:8443", "10.0.0.5:8000"):
            assert post_initialize(server.base, BOB, Host=host) == 200, host
        own = server.base.removeprefix("http://")
        for host in ("evil.example", "mcp.example.com.evil.example", "10.0.0.5:9000", own, "localhost"):
            assert post_initialize(server.base, BOB, Host=host) == 421, host
    # On loopback, without --allowed-host, the SDK's own localhost guard stays on.
    with served(module, "--tokens-file", tokens, cwd=tmp_path) as server:
        assert post_initialize(server.base, BOB) == 200
        assert post_initialize(server.base, BOB, Host="evil.example") == 421


# --- the audit trail, once ------------------------------------------------------------------


@pytest.mark.slow
def test_cli_audit_prints_each_decision_once_when_the_module_configured_logging(tmp_path: Path) -> None:
    """mcp 1.x configures the root logger when a server is made, and users call basicConfig: a record
    that also propagated to the root would be printed twice."""
    prelude = "import logging\nlogging.basicConfig(level=logging.INFO, format='ROOT %(name)s %(message)s')\n"
    tokens = tokens_file(tmp_path, {BOB: {"sub": "bob"}})
    module = user_module(tmp_path, prelude=prelude)
    SECRETS.add("sk-wrong-Lq2Vx8Zm4Tr7")
    with served(module, "--tokens-file", tokens, "--audit", cwd=tmp_path) as server:
        assert post_initialize(server.base, None) == 401
        assert post_initialize(server.base, "sk-wrong-Lq2Vx8Zm4Tr7") == 401
        assert post_initialize(server.base, BOB) == 200
    trail = [line for line in server.stderr if "mcp_bearer.audit" in line]
    outcomes = [line.split("mcp_bearer.audit ", 1)[1].split(":", 1)[0] for line in trail]
    assert outcomes == ["401 unauthorized", "401 invalid_token", "allowed"], server.stderr


# --- refusing what cannot work ---------------------------------------------------------------

WRAPPED = """\
from {module} import BearerAuthMiddleware, StaticTokenProvider


async def inner(scope, receive, send):
    await send({{"type": "http.response.start", "status": 200, "headers": []}})
    await send({{"type": "http.response.body", "body": b"inner"}})


app = BearerAuthMiddleware(inner, StaticTokenProvider({{"sk-own-key-Pz4Kd9Qw": {{"sub": "x"}}}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("vendored", [False, True], ids=["installed", "vendored-copy"])
def test_cli_refuses_an_app_already_behind_the_middleware(tmp_path: Path, vendored: bool) -> None:
    """A second middleware in front would check keys the first does not know: every request 401."""
    module = "mcp_bearer"
    if vendored:  # a copy under another name: its class is not ours, but it is the same middleware
        shutil.copy(Path(REPO) / "mcp_bearer.py", tmp_path / "vendored_bearer.py")
        module = "vendored_bearer"
    (tmp_path / "guarded.py").write_text(WRAPPED.format(module=module))
    tokens = tokens_file(tmp_path, {BOB: {"sub": "bob"}})
    message = one_error_line(run("guarded:app", "--tokens-file", tokens, "--port", "0", cwd=tmp_path))
    assert message.startswith("guarded:app is already behind BearerAuthMiddleware"), message
    assert "pass the app or MCP server it wraps instead" in message


# Packages the command line may need, each in a directory of its own so an interpreter without
# site-packages (python -S) can be given exactly some of them.
SITE = Path(next(p for p in sys.path if p.endswith("site-packages")))


def only_packages(directory: Path, *names: str) -> str:
    directory.mkdir()
    for name in names:
        (directory / name).symlink_to(SITE / name)
    return str(directory)


@pytest.mark.slow
def test_cli_install_hints_name_real_packages(tmp_path: Path) -> None:
    """A hint must be installable as typed: mcp_bearer has no extras a vendored copy could install."""
    bare = (sys.executable, "-S", "-m", "mcp_bearer")
    uvicorn_only = only_packages(tmp_path / "uvicorn-only", "uvicorn", "click", "h11")
    cases = [
        ([], REPO, "the command line serves with uvicorn, which is not installed: pip install uvicorn"),
        ([], f"{REPO}:{uvicorn_only}", "the demo needs the mcp package (No module named 'mcp'); pip install mcp"),
        (
            ["--jwks-url", "https://auth.example.com/k", "--issuer", ISSUER, "--audience", AUDIENCE],
            REPO,
            "JWTProvider needs PyJWT 2.13 or newer with its crypto extra: pip install 'pyjwt[crypto]>=2.13'",
        ),
        (["--redis-url", "redis://127.0.0.1:1"], REPO, "RedisStore needs the redis client: pip install redis"),
    ]
    for args, path, hint in cases:
        result = run(*args, "--port", "0", command=bare, env={"PYTHONPATH": path})
        assert one_error_line(result) == hint
        assert "mcp_bearer[" not in result.stderr


def test_cli_help_says_every_token_source_is_added_not_instead() -> None:
    """--tokens-file, --jwks-url, --jwt-key-file and --introspection-url chain: none replaces another."""
    text = " ".join(run("--help").stdout.split())  # argparse wraps lines anywhere
    assert "instead of" not in text
    for flag, words in (
        ("--jwks-url URL", "also accept JWT access tokens"),
        ("--jwt-key-file FILE", "also accept JWTs"),
        ("--introspection-url URL", "also accept opaque tokens"),
    ):
        assert f"{flag} {words}" in text, flag


# The Python parameters behind the flags: a message naming one speaks of code the user never typed.
PARAMETERS = re.compile(r"\b(" + "|".join(name for name in mcp_bearer._FLAGS if "_" in name) + r")\b")
BARE_PARAMETER = re.compile(r"(leeway|ttl|url|key|issuer|audience|algorithms|resource|until|before)\b")


@pytest.fixture
def key_files(tmp_path: Path) -> Path:
    """PEM keys and secrets for --jwt-key-file: a public, a private, a short secret, a good one."""
    key = private_key("rs1")
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "public.pem").write_bytes(public)
    (tmp_path / "private.pem").write_bytes(private)
    (tmp_path / "short.secret").write_text("hs-short-Rk2Wq\n")
    (tmp_path / "hmac.secret").write_text(HMAC_SECRET + "\n")  # a trailing newline, as editors write
    SECRETS.add("hs-short-Rk2Wq")
    return tmp_path


JWT_ARGS = ["--issuer", ISSUER, "--audience", AUDIENCE]
JWKS_ARGS = ["--jwks-url", "https://auth.example.com/keys", *JWT_ARGS]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jwks-url", "http://auth.example.com/keys", *JWT_ARGS], "--jwks-url must use https://"),
        (["--exclude", "health"], "--exclude entries must start with '/': 'health'"),
        ([*JWKS_ARGS, "--leeway", "-1"], "--leeway must be a finite number of seconds, >= 0: -1.0"),
        ([*JWKS_ARGS, "--leeway", "nan"], "--leeway must be a finite number of seconds, >= 0: nan"),
        ([*JWKS_ARGS, "--jwks-cache-seconds", "0"], "--jwks-cache-seconds must be a finite number of seconds, > 0"),
        ([*JWKS_ARGS, "--jwks-refresh-cooldown", "-5"], "--jwks-refresh-cooldown must be a finite number of seconds"),
        ([*JWKS_ARGS, "--algorithm", "RS257"], "unknown algorithm 'RS257'"),
        (["--max-failures", "0"], "--max-failures must be a positive int, not 0"),
        (["--cache-ttl", "-1"], "--cache-ttl must be a finite number of seconds, > 0"),
        (["--allowed-origin", "app.example"], "--allowed-origin entries must be origins like"),
        (["--resource", RESOURCE, "--authorization-server", "ftp://a.example"], "--authorization-server must be an"),
        (["--resource", RESOURCE], "--resource needs --authorization-server"),
        (["--jwt-key-file", "{keys}/private.pem", *JWT_ARGS], "--jwt-key-file is a private key; give the server"),
        (["--jwt-key-file", "{keys}/public.pem", "--algorithm", "HS256", *JWT_ARGS], "--jwt-key-file looks like a"),
        (["--jwt-key-file", "{keys}/short.secret", "--algorithm", "HS256", *JWT_ARGS], "--jwt-key-file is too short"),
        (["--jwt-key-file", "{keys}/public.pem", "--algorithm", "ES256", *JWT_ARGS], "--jwt-key-file is not a PEM"),
        (["--jwt-key-file", "{keys}/none.pem", *JWT_ARGS], "cannot read --jwt-key-file '{keys}/none.pem'"),
        ([*JWKS_ARGS, "--jwt-key-file", "{keys}/public.pem"], "give one of --jwks-url (the issuer's keys) and"),
        (["--jwt-key-file", "{keys}/public.pem"], "--jwks-url and --jwt-key-file need --issuer and --audience"),
        (["--leeway", "5"], "--issuer, --algorithm, --leeway and the --jwks-* options need --jwks-url or"),
        (["--introspection-url", "http://auth.example.com/i", "--client-id", "c"], "--introspection-url must use"),
    ],
)
def test_cli_configuration_errors_name_the_flags_typed(args: list[str], message: str, key_files: Path) -> None:
    result = run(*[a.format(keys=key_files) for a in args], "--port", "0", env={"MCP_BEARER_CLIENT_SECRET": "cs-x"})
    line = one_error_line(result)
    assert message.format(keys=key_files) in line, line
    assert not PARAMETERS.search(line) and not BARE_PARAMETER.match(line), line
    assert "hs-short-Rk2Wq" not in line and "PRIVATE" not in line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("typed", "cwd", "hint"),
    [
        ("notes_server.py:server", ".", "notes_server:server"),
        ("./notes_server.py:server", ".", "notes_server:server"),
        ("pkg/notes.py:server", ".", "pkg.notes:server"),
        ("./pkg/notes.py:server", ".", "pkg.notes:server"),
        ("{tmp}/notes_server.py:server", "pkg", "notes_server:server, from {tmp}"),
        ("../notes_server.py:server", "pkg", "notes_server:server, from {tmp}"),
    ],
)
def test_cli_a_file_given_for_the_app_gets_the_module_to_type(tmp_path: Path, typed: str, cwd: str, hint: str) -> None:
    (tmp_path / "pkg").mkdir()
    where = tmp_path / cwd
    message = one_error_line(run(typed.format(tmp=tmp_path), "--port", "0", cwd=where))
    assert message.endswith(f"names a file; give the module, as Python imports it: {hint.format(tmp=tmp_path)}")


@pytest.mark.slow
def test_cli_the_module_the_hint_names_is_served(tmp_path: Path) -> None:
    module = user_module(tmp_path, "notes_server")
    hinted = one_error_line(run("./notes_server.py:server", "--port", "0", cwd=tmp_path)).rsplit(" ", 1)[1]
    assert hinted == module
    with served(hinted, "--tokens-file", tokens_file(tmp_path, {BOB: {"sub": "bob"}}), cwd=tmp_path) as server:
        assert post_initialize(server.base, BOB) == 200


@pytest.mark.slow
@ENTRY_POINTS
def test_cli_version_is_the_installed_distributions(command: tuple[str, ...]) -> None:
    result = run("--version", command=command)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"mcp_bearer {mcp_bearer.__version__}\n", "")
    assert importlib.metadata.version("mcp_bearer") == mcp_bearer.__version__


def test_gitignore_keeps_build_output_out() -> None:
    """setuptools writes build/ on every pip install of a checkout; git status must stay clean."""
    assert "build/" in (Path(REPO) / ".gitignore").read_text().splitlines()


# --- the JWT options, end to end ---------------------------------------------------------


@pytest.mark.slow
def test_cli_leeway_is_the_clock_skew_allowed(jwks: JWKSEndpoint) -> None:
    late = sign(exp=int(time.time()) - 10)  # expired 10 s ago: within the default 30 s of skew
    args = ["--jwks-url", jwks.url, *JWT_ARGS]
    with served(*args) as server:
        assert post_initialize(server.base, late) == 200
    with served(*args, "--leeway", "0") as server:
        assert post_initialize(server.base, late) == 401
        assert post_initialize(server.base, sign()) == 200
    with served(*args, "--leeway", "120") as server:
        assert post_initialize(server.base, sign(exp=int(time.time()) - 90)) == 200
        assert post_initialize(server.base, sign(exp=int(time.time()) - 200)) == 401


def until_true(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.slow
def test_cli_jwks_cache_seconds_and_refresh_cooldown(jwks: JWKSEndpoint) -> None:
    unknown = sign(kid="rotated-away")
    with served("--jwks-url", jwks.url, *JWT_ARGS, "--jwks-cache-seconds", "1", "--jwks-refresh-cooldown", "0") as s:
        assert post_initialize(s.base, sign()) == 200 and jwks.hits == 1
        assert post_initialize(s.base, unknown) == 401 and jwks.hits == 2  # no cooldown: asked again at once
        assert post_initialize(s.base, unknown) == 401 and jwks.hits == 3
        # A set older than a second is refreshed (in the background) by the next request that uses it.
        assert until_true(lambda: post_initialize(s.base, sign()) == 200 and jwks.hits >= 4, 20), jwks.hits
    hits = jwks.hits
    with served("--jwks-url", jwks.url, *JWT_ARGS) as server:  # the defaults: an hour, 30 s
        assert post_initialize(server.base, sign()) == 200 and jwks.hits == hits + 1
        status, headers, _ = raw_request(server.base, "POST", "/mcp", {"Authorization": f"Bearer {unknown}"})
        assert (status, jwks.hits) == (503, hits + 1) and 1 <= int(headers["retry-after"]) <= 30  # in the cooldown
        time.sleep(1.5)
        assert post_initialize(server.base, sign()) == 200 and jwks.hits == hits + 1


@pytest.mark.slow
def test_cli_jwt_key_file_takes_a_pem_public_key_or_an_hmac_secret(key_files: Path) -> None:
    with served("--jwt-key-file", str(key_files / "public.pem"), *JWT_ARGS) as server:
        assert server.banner()[1] == f"  tokens: JWT access tokens from {ISSUER} (a fixed key; audience {AUDIENCE})"
        assert post_initialize(server.base, sign("RS256", "rs1")) == 200
        assert post_initialize(server.base, sign("RS256", "rs2")) == 401  # another key, the same kid
        assert post_initialize(server.base, sign("ES256", "ec1", "ec-1")) == 401
    with served("--jwt-key-file", str(key_files / "hmac.secret"), "--algorithm", "HS256", *JWT_ARGS) as server:
        assert post_initialize(server.base, sign("HS256", kid=None)) == 200
        forged = mcp_bearer._import_pyjwt(crypto=False).encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": int(time.time()) + 300},
            HMAC_SECRET + "x",
            algorithm="HS256",
        )
        SECRETS.add(forged)
        assert post_initialize(server.base, forged) == 401


# --- no OAuth pretended: discovery paths without --resource -----------------------------------

DISCOVERY = [
    ("GET", "/.well-known/oauth-authorization-server"),
    ("GET", "/.well-known/oauth-authorization-server/mcp"),  # RFC 8414 section 3.1, path-suffixed
    ("GET", "/.well-known/openid-configuration"),
    ("GET", "/.well-known/openid-configuration/mcp"),
    ("GET", "/mcp/.well-known/openid-configuration"),  # OIDC Discovery 1.0 section 4, path-appended
    ("GET", "/.well-known/oauth-protected-resource"),
    ("GET", "/.well-known/oauth-protected-resource/mcp"),  # RFC 9728 section 3.1
    ("POST", "/register"),  # RFC 7591 at the MCP 2025-03-26 fallback path
]
NOT_DISCOVERY = [
    ("POST", "/mcp"),
    ("POST", "/registerx"),
    ("POST", "/register/"),
    ("GET", "/.well-known/other"),
    ("GET", "/mcp/.well-known/oauth-authorization-server"),
    ("GET", "/.well-known"),
]
NO_OAUTH = {"error": "not_found", "error_description": "No OAuth here: send an API key as Authorization: Bearer <key>"}


@pytest.mark.slow
def test_cli_without_resource_oauth_discovery_is_404_and_with_it_metadata(tmp_path: Path) -> None:
    """An OAuth client that gets 401 at /register reports "registration rejected" for a mistyped key."""
    tokens = tokens_file(tmp_path, {BOB: {"sub": "bob"}})
    with served(user_module(tmp_path), "--tokens-file", tokens, cwd=tmp_path) as server:
        for method, path in DISCOVERY:
            status, headers, body = raw_request(server.base, method, path)
            assert (status, json.loads(body), headers["content-type"]) == (404, NO_OAUTH, "application/json"), path
            assert "www-authenticate" not in headers
        for method, path in NOT_DISCOVERY:
            assert raw_request(server.base, method, path)[0] == 401, path
    oauth = ["--resource", RESOURCE, "--authorization-server", "https://auth.example.com"]
    with served(user_module(tmp_path), "--tokens-file", tokens, *oauth, cwd=tmp_path) as server:
        status, _, body = raw_request(server.base, "GET", "/.well-known/oauth-protected-resource/mcp")
        assert status == 200 and json.loads(body)["resource"] == RESOURCE
        for method, path in [*DISCOVERY[:5], DISCOVERY[-1]]:  # the authorization server's own paths are not ours
            assert raw_request(server.base, method, path)[0] == 401, path


@pytest.mark.parametrize("root_path", ["", "/api"])
@pytest.mark.parametrize(("method", "path"), DISCOVERY + NOT_DISCOVERY)
def test_oauth_discovery_without_resource_is_404_for_each_path_and_root(method: str, path: str, root_path: str) -> None:
    harness = Harness()
    outcome = harness.request(path=root_path + path, method=method, root_path=root_path)
    if (method, path) in DISCOVERY:
        assert (outcome.status, outcome.json(), outcome.header("www-authenticate")) == (404, NO_OAUTH, None)
    else:
        assert outcome.status == 401
    assert outcome.app_calls == [] and outcome.provider_calls == []
    assert harness.request(bearer(BOB), path=root_path + path, method=method, root_path=root_path).status == 200


# --- what is protected, said at startup ---------------------------------------------------


@pytest.mark.slow
def test_cli_banner_says_what_is_protected(
    tmp_path: Path, jwks: JWKSEndpoint, introspection: IntrospectionEndpoint
) -> None:
    keys = [new_api_key()[0] for _ in range(2)]
    SECRETS.update(keys)
    records = [
        {"id": mcp_bearer._key_id(k), "sha256": mcp_bearer._digest(k).hex(), "claims": {"sub": "a"}} for k in keys
    ]
    (tmp_path / "keys.json").write_text(json.dumps({"keys": records}))
    (tmp_path / "keys.json").chmod(0o600)
    args = ["--tokens-file", "keys.json", "--jwks-url", jwks.url, *JWT_ARGS, "--introspection-url", introspection.url]
    args += ["--client-id", CLIENT_ID, "--cache-ttl", "60", "--required-scope", "mcp:tools", "--required-scope", "x"]
    args += ["--exclude", "/health", "--exclude", "/status", "--max-failures", "5"]
    args += ["--resource", RESOURCE, "--authorization-server", "https://auth.example.com"]
    with served(user_module(tmp_path), *args, cwd=tmp_path, env={"MCP_BEARER_CLIENT_SECRET": CLIENT_SECRET}) as server:
        banner = server.banner()
        metadata = f"{server.base}/.well-known/oauth-protected-resource/mcp"
        assert raw_request(server.base, "GET", metadata.removeprefix(server.base))[0] == 200
    cached = " (verdicts cached 60 s)"
    assert banner == [
        f"Serving {server.base}/mcp behind bearer-token authentication (Ctrl+C to stop)",
        f"  tokens: 2 API keys from keys.json (re-read when it changes){cached}",
        f"  tokens: JWT access tokens from {ISSUER} (JWKS {jwks.url}; audience {AUDIENCE}){cached}",
        f"  tokens: opaque tokens introspected at {introspection.url}{cached}",
        "  required scopes: mcp:tools x",
        "  public paths: /health, /status",
        f"  resource metadata: {metadata}",
        "  throttle: 429 after 5 refused tokens per address per minute",
    ]
    assert not [line for line in banner + server.stderr if any(str(r["sha256"])[:16] in line for r in records)]


# --- why a token was refused: for operators, never for the client, never the token ---------


class Reasonless(BearerAuthProvider):
    """A provider of the user's own that says no without saying why."""

    async def verify_token(self, token: str) -> AccessToken | None:
        return None


@dataclasses.dataclass
class Services:
    """What a refusal case builds its provider from: the token services on loopback, a directory."""

    jwks: JWKSEndpoint
    introspection: IntrospectionEndpoint
    tmp_path: Path

    def jwt(self, *primed: str) -> BearerAuthProvider:
        provider = JWTProvider(issuer=ISSUER, audience=AUDIENCE, jwks_url=self.jwks.url)
        for token in primed:  # fetch the key set first: some refusals differ once it is in hand
            assert anyio.run(provider.verify_token, token) is not None
        return provider

    def expired_key(self) -> BearerAuthProvider:
        """A keys file whose one key, OURS, expired a second ago."""
        record = {"id": OURS_ID, "sha256": mcp_bearer._digest(OURS).hex(), "claims": {"sub": "old"}}
        path = self.tmp_path / "keys.json"
        path.write_text(json.dumps({"keys": [{**record, "expires_at": time.time() - 1}]}))
        return StaticTokenProvider.from_file(path)


OURS, OURS_ID = new_api_key()
UNLISTED, UNLISTED_ID = new_api_key()  # one of our keys, in no keys file: revoked, or never issued
TYPO = OURS[:20] + ("A" if OURS[20] != "A" else "B") + OURS[21:]
NOBODY = "sk-nobody-Vf3Qh8Lw2Zr5"
SECRETS.update({OURS, UNLISTED, TYPO, NOBODY, mcp_bearer._digest(OURS).hex(), mcp_bearer._digest(UNLISTED).hex()})
Make = Callable[[Services], BearerAuthProvider]
# (case, provider, token, reason, middleware options): every way a provider of this module says no.
REFUSALS: list[tuple[str, Make, Callable[[], str], str, dict[str, Any]]] = [
    ("jwt-expired", Services.jwt, lambda: sign(exp=int(time.time()) - 100), "expired", {}),
    (
        "jwt-not-yet-valid",
        Services.jwt,
        lambda: sign(nbf=int(time.time()) + 600),
        "not yet valid (nbf or iat in the future)",
        {},
    ),
    (
        "jwt-wrong-issuer",
        Services.jwt,
        lambda: sign(iss="https://evil.example/"),
        "wrong issuer 'https://evil.example/'",
        {},
    ),
    (
        "jwt-wrong-issuer-keys-in-hand",
        lambda s: s.jwt(sign()),
        lambda: sign(iss="https://evil.example/"),
        "wrong issuer 'https://evil.example/'",
        {},
    ),
    (
        "jwt-issuer-forging-a-line",  # the issuer is the client's text: quoted, so it cannot start a log line
        lambda s: s.jwt(sign()),
        lambda: sign(iss="https://evil.example/\r\nINFO forged"),
        "wrong issuer 'https://evil.example/\\r\\nINFO forged'",
        {},
    ),
    ("jwt-wrong-audience", Services.jwt, lambda: sign(aud="https://other.example/mcp"), "wrong audience", {}),
    ("jwt-unknown-kid", Services.jwt, lambda: sign(kid="rotated-away"), "unknown key id 'rotated-away' for RS256", {}),
    ("jwt-bad-signature", Services.jwt, lambda: sign("RS256", "rs2", "rsa-1"), "bad signature", {}),
    ("jwt-algorithm", Services.jwt, lambda: sign("ES256", "ec1", "ec-1"), "algorithm not allowed: 'ES256'", {}),
    ("jwt-malformed-header", Services.jwt, lambda: "bm90.YS5q.d3Q", "malformed JWS header", {}),
    ("jwt-not-a-jwt", Services.jwt, lambda: NOBODY, "not a JWT (no compact JWS: three base64url segments)", {}),
    (
        "introspection-inactive",
        lambda s: introspector(s.introspection),
        lambda: INACTIVE,
        "inactive (introspection)",
        {},
    ),
    (
        "introspection-wrong-audience",
        lambda s: introspector(s.introspection, audience=RESOURCE),
        lambda: AUD_OTHER,
        "wrong audience (introspection)",
        {},
    ),
    (
        "api-key-of-ours-unknown",
        lambda s: StaticTokenProvider({BOB: {}}),
        lambda: UNLISTED,
        f"unknown or revoked API key {UNLISTED_ID}",
        {},
    ),
    ("api-key-unknown", lambda s: StaticTokenProvider({BOB: {}}), lambda: NOBODY, "unknown API key", {}),
    (
        "api-key-typo",
        lambda s: StaticTokenProvider({BOB: {}}),
        lambda: TYPO,
        "malformed API key (its checksum does not hold)",
        {},
    ),
    ("api-key-expired", Services.expired_key, lambda: OURS, "expired", {}),
    (
        "too-long",
        lambda s: StaticTokenProvider({BOB: {}}),
        lambda: "x" * 65,
        "longer than max_token_length (64)",
        {"max_token_length": 64},
    ),
    ("reasonless-provider", lambda s: Reasonless(), lambda: NOBODY, "refused by the provider", {}),
    # A chain says why the provider that knows the token's kind refused it, not that another found it foreign.
    (
        "chain-api-key-of-ours",
        lambda s: ProviderChain(StaticTokenProvider({BOB: {}}), s.jwt()),
        lambda: UNLISTED,
        f"unknown or revoked API key {UNLISTED_ID}",
        {},
    ),
    (
        "chain-jwt",
        lambda s: ProviderChain(StaticTokenProvider({BOB: {}}), s.jwt()),
        lambda: sign(kid="rotated-away"),
        "unknown key id 'rotated-away' for RS256",
        {},
    ),
    (
        "chain-neither",
        lambda s: ProviderChain(StaticTokenProvider({BOB: {}}), s.jwt()),
        lambda: NOBODY,
        "unknown API key",
        {},
    ),
    (
        "chain-introspection",
        lambda s: ProviderChain(StaticTokenProvider({BOB: {}}), introspector(s.introspection)),
        lambda: INACTIVE,
        "inactive (introspection)",
        {},
    ),
]


@pytest.mark.parametrize(
    ("make", "token", "reason", "options"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS]
)
def test_every_refusal_has_its_reason_once_for_operators_and_never_the_token(
    make: Make,
    token: Callable[[], str],
    reason: str,
    options: dict[str, Any],
    jwks: JWKSEndpoint,
    introspection: IntrospectionEndpoint,
    tmp_path: Path,
) -> None:
    provider = make(Services(jwks, introspection, tmp_path))
    presented = token()
    SECRETS.add(presented)
    harness = Harness(provider, audit=True, **options)
    with mcp_bearer_log() as records:
        outcome = harness.request(bearer(presented))
    assert (outcome.status, outcome.json()) == (401, INVALID_TOKEN)
    assert outcome.header("www-authenticate") == CHALLENGE_INVALID  # the client learns nothing more
    refused = [r for r in records if r.name == "mcp_bearer" and r.msg == "token refused: %r"]
    assert [(r.levelno, r.args) for r in refused] == [(logging.DEBUG, (reason,))]
    audit = [r for r in records if r.name == "mcp_bearer.audit"]
    assert len(audit) == 1 and vars(audit[0])["mcp_bearer"]["reason"] == reason
    assert audit[0].getMessage().endswith(f", reason {reason!r}")
    for record in records:
        text = logging.Formatter().format(record)
        assert presented not in text and "\n" not in text, text


def test_a_reason_belongs_to_its_own_refusal() -> None:
    """Two refusals in one task (a server that reuses it, a test client): the second must not inherit the first's."""
    harness = Harness(KeysThenSilence())

    async def twice() -> None:
        for token in (NOBODY, "sk-says-nothing-Hq7Vd2"):
            await harness.middleware(
                {
                    "type": "http",
                    "method": "POST",
                    "path": "/mcp",
                    "headers": bearer(token),
                    "client": ("127.0.0.1", 1),
                },
                receive_nothing,
                send_nothing,
            )

    SECRETS.add("sk-says-nothing-Hq7Vd2")
    with mcp_bearer_log() as records:
        anyio.run(twice)
    assert [r.args for r in records if r.msg == "token refused: %r"] == [
        ("unknown API key",),
        ("refused by the provider",),
    ]


class KeysThenSilence(BearerAuthProvider):
    """API keys, and for any other token a plain None, no reason given: as a user's own provider says it."""

    def __init__(self) -> None:
        self.keys = StaticTokenProvider({BOB: {"sub": "bob"}})

    async def verify_token(self, token: str) -> AccessToken | None:
        return None if token.startswith("sk-says-nothing") else await self.keys.verify_token(token)


async def receive_nothing() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send_nothing(message: Any) -> None:
    pass


@pytest.mark.slow
def test_cli_audit_trail_names_why_each_token_was_refused(tmp_path: Path, jwks: JWKSEndpoint) -> None:
    record = {"id": OURS_ID, "sha256": mcp_bearer._digest(OURS).hex(), "claims": {"sub": "alice"}}
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [record]}))
    (tmp_path / "keys.json").chmod(0o600)
    args = ["--tokens-file", "keys.json", "--jwks-url", jwks.url, *JWT_ARGS, "--audit"]
    refused = [
        (UNLISTED, f"unknown or revoked API key {UNLISTED_ID}"),
        (TYPO, "malformed API key (its checksum does not hold)"),
        (sign(exp=int(time.time()) - 100), "expired"),
        (sign(iss="https://evil.example/"), "wrong issuer 'https://evil.example/'"),
        (NOBODY, "unknown API key"),  # foreign to both providers: the first one's word
    ]
    with served(user_module(tmp_path), *args, cwd=tmp_path) as server:
        assert post_initialize(server.base, OURS) == 200
        for token, _ in refused:
            assert post_initialize(server.base, token) == 401
        assert until_true(lambda: len([line for line in server.stderr if "mcp_bearer.audit" in line]) == 6, 10)
    trail = [line for line in server.stderr if "mcp_bearer.audit" in line]
    assert "reason" not in trail[0]
    for line, (_, reason) in zip(trail[1:], refused, strict=True):
        assert line.endswith(f", reason {reason!r}"), line
