"""The README's code, as users will copy it: each block run as written, against real servers."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from mcp_bearer import (
    BearerAuthMiddleware,
    JWTProvider,
    StaticTokenProvider,
)
from support import (
    BOB,
    INITIALIZE,
    MCP_MAJOR,
    MCP_POST_HEADERS,
    NOT_BUILT,
    REPO,
    SECRETS,
    TOKENS,
    Harness,
    JWKSEndpoint,
    Server,
    bearer,
    call_json,
    closed_port_url,
    mcp_bearer_log,
    mcp_session,
    raw_request,
    serve,
    tool_text,
    whoami,
)


def readme_block(marker: str, language: str = "python") -> str:
    """The README's code block (```language) that contains ``marker``: exactly one."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as readme:
        blocks = readme.read().split(f"```{language}\n")[1:]
    (block,) = [b.split("```", 1)[0] for b in blocks if marker in b]
    return block


def readme_server(marker: str) -> str:
    """A README server block, as a reader on this mcp generation pastes it (the import comment says how)."""
    source = readme_block(marker)
    if MCP_MAJOR == 1:
        source = source.replace(
            "from mcp.server.mcpserver import MCPServer", "from mcp.server.fastmcp import FastMCP as MCPServer"
        )
    return source


@pytest.mark.slow
@pytest.mark.anyio
async def test_readme_quick_start_server_works_as_written() -> None:
    source = readme_server("# server.py")
    SECRETS.update({"sk-abc123", "sk-def456"})
    namespace: dict[str, Any] = {"__name__": "server"}
    exec(compile(source, "README.md:server.py", "exec"), namespace)
    with serve(namespace["app"]) as base:
        assert raw_request(base, "POST", "/mcp", MCP_POST_HEADERS, INITIALIZE)[0] == 401
        async with mcp_session(base + "/mcp", "sk-def456") as (session, _):
            result = await session.call_tool("whoami", {})
            assert tool_text(result) == "Hello bob@example.com"


@pytest.mark.slow
@pytest.mark.anyio
async def test_readme_jwt_provider_example_works_as_written() -> None:
    """The README's JWTProvider block against a real JWKS endpoint and the SDK's client."""
    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys

    key = rsa_keys.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1"}

    jwks = JWKSEndpoint()  # the JWT section's test endpoint, serving just this key
    jwks.keys = [jwk]

    def sign(**claims: Any) -> str:
        now = int(time.time())
        body = {"iss": "https://auth.example.com/", "aud": "https://mcp.example.com/mcp", "sub": "alice"}
        token = pyjwt.encode({**body, "exp": now + 60, **claims}, key, algorithm="RS256", headers={"kid": "k1"})
        SECRETS.add(token)
        return token

    with serve(jwks) as jwks_base:
        source = readme_block("# at most one refetch").replace(
            "https://auth.example.com/.well-known/jwks.json", jwks_base + "/jwks"
        )
        namespace: dict[str, Any] = {"server": Server("readme")}
        namespace["server"].tool()(whoami)
        exec(compile(source, "README.md:jwt", "exec"), namespace)
        with serve(namespace["app"]) as base:
            async with mcp_session(base + "/mcp", sign(scope="mcp:tools")) as (session, _):
                seen = await call_json(session, "whoami")
                assert seen["claims"]["sub"] == "alice"
            refused = [
                sign(scope="mcp:read"),  # lacks the required scope: 403
                sign(scope="mcp:tools", aud="https://other.example.com/mcp"),  # a token for another resource
                sign(scope="mcp:tools", exp=int(time.time()) - 60),
            ]
            statuses = [raw_request(base, "POST", "/mcp", {"Authorization": f"Bearer {t}"})[0] for t in refused]
            assert statuses == [403, 401, 401]


def key_set_settings(provider: JWTProvider) -> tuple[bool, str | None, tuple[str, ...]]:
    """Whether a key set was fetched yet, the JWKS URL, the pinned algorithms: private to mcp_bearer."""
    jwks = provider._jwks
    assert jwks is not None
    return jwks.key_set is not None, jwks.url, provider._algorithms


def test_readme_identity_provider_settings_construct_offline() -> None:
    """Copy-paste settings: they build (no fetch happens before the first token) and pin what they say."""
    namespace: dict[str, Any] = {}
    exec(compile(readme_block("# Auth0:"), "README.md:idps", "exec"), namespace)
    for name in ("auth0", "keycloak", "entra"):
        provider = namespace[name]
        assert isinstance(provider, JWTProvider)
        fetched, jwks_url, algorithms = key_set_settings(provider)
        assert not fetched
        assert jwks_url is not None and jwks_url.startswith("https://") and algorithms == ("RS256",)


def test_readme_introspection_cache_and_chain_compose_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """The three blocks in one namespace, as a reader pastes them, with the token services unreachable."""
    down = closed_port_url()
    monkeypatch.setenv("MCP_BEARER_CLIENT_SECRET", "cs-readme-Qm4Tn8Wz")
    SECRETS.update({"cs-readme-Qm4Tn8Wz", "sk-ci-robot"})
    namespace: dict[str, Any] = {
        "server": Server("readme"),
        "jwt_provider": JWTProvider(issuer="i", audience="a", jwks_url=down + "/jwks"),
    }
    for marker in ("introspection = IntrospectionProvider(", "provider = CachedProvider(introspection", "api_keys ="):
        source = readme_block(marker).replace("https://auth.example.com/oauth2/introspect", down + "/introspect")
        exec(compile(source, "README.md:providers", "exec"), namespace)
    assert isinstance(namespace["app"], BearerAuthMiddleware)
    harness = Harness(namespace["provider"])
    robot = harness.request(bearer("sk-ci-robot"))  # API keys first: no token service asked
    seen = robot.app_calls[0][1]
    assert robot.status == 200 and seen is not None and seen.claims["sub"] == "ci-robot"
    header = base64.urlsafe_b64encode(b'{"alg":"RS256","kid":"k1"}').rstrip(b"=").decode()
    for token in ("opaque-Lk2Vb9Xq", f"{header}.e30.c2ln"):  # introspection down; a JWT with the JWKS down
        SECRETS.add(token)
        outcome = harness.request(bearer(token))
        assert outcome.status == 503 and outcome.header("retry-after") is not None, token


# --- per-operation authorization, as the README's worked example has it ----------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_readme_per_operation_example_answers_the_403_it_shows() -> None:
    """The CI robot's key may list but not rename: the 403 it gets is the one the README prints."""
    source = readme_server("# projects_server.py")
    SECRETS.add("sk-ci-robot")
    namespace: dict[str, Any] = {"__name__": "projects_server"}
    exec(compile(source, "README.md:projects_server.py", "exec"), namespace)
    shown = readme_block("HTTP/1.1 403 Forbidden", "http")
    shown_challenge = next(line for line in shown.splitlines() if line.startswith("www-authenticate: "))
    shown_body = json.loads(shown.strip().splitlines()[-1])
    robot = {"Authorization": "Bearer sk-ci-robot", **MCP_POST_HEADERS}
    with serve(namespace["app"]) as base:
        async with mcp_session(base + "/mcp", "sk-ci-robot") as (session, _):  # the 2025-11-25 handshake
            listed = await session.call_tool("list_projects", {})
            assert "apollo" in tool_text(listed)  # listed, not refused
        for tool in ("rename_project", "delete_project"):
            call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": tool, "arguments": {}}}
            status, headers, body = raw_request(base, "POST", "/mcp", robot, json.dumps(call).encode())
            assert status == 403, (tool, body)
            if tool == "rename_project":  # as printed, to the byte
                assert f"www-authenticate: {headers['www-authenticate']}" == shown_challenge
                assert json.loads(body) == shown_body
            else:  # admin: all that the operation needs, in one challenge
                assert json.loads(body)["scope"] == "mcp:tools projects:admin"
    assert namespace["PROJECTS"] == {"apollo": "active", "gemini": "archived"}  # nothing renamed, nothing deleted


# --- FastAPI and Starlette's add_middleware, as the README shows them -------------------


@pytest.mark.slow
def test_readme_fastapi_add_middleware_serves_its_docs_and_guards_its_routes() -> None:
    SECRETS.add("sk-abc123")
    namespace: dict[str, Any] = {"__name__": "fastapi_app"}
    exec(compile(readme_block("# fastapi_app.py"), "README.md:fastapi_app.py", "exec"), namespace)
    with serve(namespace["app"]) as base:
        assert raw_request(base, "GET", "/docs")[0] == 200
        status, _, body = raw_request(base, "GET", "/openapi.json")  # the docs page fetches it
        assert status == 200 and "/whoami" in json.loads(body)["paths"]
        assert raw_request(base, "GET", "/health")[0] == 200
        assert raw_request(base, "GET", "/whoami")[0] == 401
        status, _, body = raw_request(base, "GET", "/whoami", {"Authorization": "Bearer sk-abc123"})
        assert status == 200 and json.loads(body) == {"sub": "alice"}


@pytest.mark.slow
def test_fastapi_with_the_default_excluded_paths_guards_the_schema_its_docs_page_needs() -> None:
    from fastapi import FastAPI

    app = FastAPI()
    app.add_middleware(BearerAuthMiddleware, provider=StaticTokenProvider(TOKENS))
    with serve(app) as base:
        assert raw_request(base, "GET", "/docs")[0] == 200
        assert raw_request(base, "GET", "/openapi.json")[0] == 401  # why the README says what to pass


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["fastapi", "starlette"])
def test_add_middleware_with_a_bad_option_is_an_error_record_at_startup(framework: str) -> None:
    """Starlette builds middleware lazily; uvicorn's lifespan="auto" reports a failing lifespan at INFO only."""
    from fastapi import FastAPI
    from starlette.applications import Starlette

    app = FastAPI() if framework == "fastapi" else Starlette()
    app.add_middleware(BearerAuthMiddleware, provider=StaticTokenProvider(TOKENS), max_sessions=0)
    expected = (logging.ERROR, f"{NOT_BUILT}ValueError: max_sessions must be a positive int, not 0")
    with mcp_bearer_log() as records, serve(app, lifespan="auto") as base:
        assert [(r.levelno, r.getMessage()) for r in records] == [expected]  # before any request
        assert raw_request(base, "GET", "/", {"Authorization": f"Bearer {BOB}"})[0] == 500
        assert [(r.levelno, r.getMessage()) for r in records] == [expected] * 2  # each retry is logged too


# --- what the README promises of the module: the standard library only ------------------


def test_module_imports_only_the_standard_library() -> None:
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]); import mcp_bearer; "
        "third = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'mcp_bearer', '__main__'}; "
        "assert not third, third"
    )
    result = subprocess.run([sys.executable, "-I", "-S", "-c", check, REPO], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
