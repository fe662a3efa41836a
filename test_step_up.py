"""End to end: a token that lacks an operation's scopes is answered 403, and the SDK's OAuth client steps up.

MCP 2026-07-28, Authorization, "Scope Challenge Handling": a resource server answers a valid token
that lacks the scopes an operation needs with HTTP 403 and ``WWW-Authenticate: Bearer
error="insufficient_scope", scope="...", resource_metadata="..."`` (RFC 6750 section 3.1, RFC 9728
section 5.1); the client re-authorizes for the union of what it holds and what was challenged, and
retries. Everything here is real: an OAuth 2.1 authorization server of our own (RFC 8414 metadata,
RFC 7591 registration, PKCE, RFC 8707 resource indicators, RS256 JWTs signed with a key from
``cryptography``), the SDK's MCP server behind ``BearerAuthMiddleware``, both under uvicorn on free
loopback ports, and the SDK's own ``OAuthClientProvider`` (and the TypeScript SDK's clients, from
ts_client/). Only the person at the consent screen is stood in for: the authorization endpoint
approves at once.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp.client.auth import OAuthClientProvider
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from mcp_bearer import BearerAuthMiddleware, JWTProvider, ProviderChain, StaticTokenProvider
from support import (
    GENERATIONS,
    HANDSHAKE,
    MCP_MAJOR,
    MODERN,
    SECRETS,
    ListHandler,
    Server,
    httpx,
    loopback_listener,
    record_text,
    sdk_client,
    serve,
)

# The tests adapt to mcp 2.x or 1.x (as support.py does); mypy checks them against 2.x.
if TYPE_CHECKING:
    from mcp.shared.auth import AuthorizationCodeResult
    from mcp.shared.exceptions import MCPError
else:
    try:  # mcp 2.x
        from mcp.shared.auth import AuthorizationCodeResult
        from mcp.shared.exceptions import MCPError
    except ImportError:  # mcp 1.x: no Client, no 2026-07-28, the callback answers (code, state)
        from mcp.shared.exceptions import McpError as MCPError

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

REQUIRED = ["mcp:tools"]
NEVER_GRANTED = "never:granted"  # the authorization server drops it from every grant, as real ones do
OPERATION_SCOPES = {"tools/call delete_project": ["projects:delete"], "tools/call forbidden": [NEVER_GRANTED]}
SCOPES_SUPPORTED = ["mcp:tools", "projects:delete", NEVER_GRANTED]
API_KEY = "sk-ci-bot-9Qw2Er4Ty6Ui8Op0As1D"
API_KEY_CLAIMS = {"sub": "ci-bot", "scopes": ["mcp:tools"]}
USER = "alice"  # who approves every authorization
REDIRECT_URI = "http://127.0.0.1:9/callback"  # never fetched: the stand-in browser reads the redirect
WAIT = 60  # seconds any one test may take on a busy 2-core machine; a loop would hit it, not hang CI
LEGACY = HANDSHAKE  # the initialize handshake generation
TS_CLIENT = Path(__file__).parent / "ts_client"  # the TypeScript SDK's client: step_up.mjs, pinned by its lockfile


# --- the authorization server ---------------------------------------------------


@dataclass
class Grant:
    """What one approval (a code, then its refresh token) stands for."""

    client_id: str
    scopes: list[str]
    resource: str
    redirect_uri: str = ""
    code_challenge: str = ""


@dataclass
class AuthorizationServer:
    """A small OAuth 2.1 authorization server that approves every authorization at once.

    It records what each authorization asked for and what each token request was granted,
    and every secret it hands out, for the log scan.
    """

    issuer: str
    resource: str  # RFC 8707: the one resource it issues tokens for; any other is invalid_target
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    kid: str = field(default_factory=lambda: secrets.token_hex(8))
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    codes: dict[str, Grant] = field(default_factory=dict)
    refresh_grants: dict[str, Grant] = field(default_factory=dict)
    authorizations: list[list[str]] = field(default_factory=list)  # the scopes each one asked for
    token_requests: list[tuple[str, list[str]]] = field(default_factory=list)  # (grant_type, scopes granted)
    issued: set[str] = field(default_factory=set)  # every secret handed out
    refresh_tokens: bool = True  # whether token responses carry one

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/oauth-authorization-server", self.metadata),
                Route("/register", self.register, methods=["POST"]),
                Route("/authorize", self.authorize),
                Route("/token", self.token, methods=["POST"]),
                Route("/jwks", self.jwks),
            ]
        )

    async def metadata(self, request: Request) -> Response:
        # RFC 8414 section 2; MCP requires PKCE with S256 (OAuth 2.1 section 4.1.1).
        return JSONResponse(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "registration_endpoint": f"{self.issuer}/register",
                "jwks_uri": f"{self.issuer}/jwks",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_post", "none"],
                "scopes_supported": SCOPES_SUPPORTED,
                "authorization_response_iss_parameter_supported": True,  # RFC 9207
            }
        )

    async def register(self, request: Request) -> Response:
        # RFC 7591 section 3.2.1: the server's record of the client, with its credentials.
        metadata = await request.json()
        if not metadata.get("redirect_uris"):
            return JSONResponse({"error": "invalid_redirect_uri"}, status_code=400)
        client = {**metadata, "client_id": secrets.token_urlsafe(16), "client_id_issued_at": int(time.time())}
        client.setdefault("token_endpoint_auth_method", "client_secret_post")
        if client["token_endpoint_auth_method"] != "none":
            client["client_secret"] = secrets.token_urlsafe(32)
            self.issued.add(client["client_secret"])
        self.clients[client["client_id"]] = client
        return JSONResponse(client, status_code=201)

    async def authorize(self, request: Request) -> Response:
        query = request.query_params
        client = self.clients.get(query.get("client_id", ""))
        redirect_uri = query.get("redirect_uri", "")
        if client is None or redirect_uri not in client["redirect_uris"]:
            # RFC 6749 section 4.1.2.1: never redirect to an unverified URI.
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        answer: dict[str, str] = {"state": query.get("state", ""), "iss": self.issuer}
        if query.get("response_type") != "code" or query.get("code_challenge_method") != "S256":
            answer["error"] = "invalid_request"
        elif query.get("resource") != self.resource:
            answer["error"] = "invalid_target"  # RFC 8707 section 2
        else:
            scopes = query.get("scope", "").split()
            self.authorizations.append(scopes)
            code = secrets.token_urlsafe(32)
            self.issued.add(code)
            self.codes[code] = Grant(client["client_id"], scopes, self.resource, redirect_uri, query["code_challenge"])
            answer["code"] = code
        return RedirectResponse(f"{redirect_uri}?{urlencode(answer)}", status_code=302)

    async def token(self, request: Request) -> Response:
        form = {name: values[0] for name, values in parse_qs((await request.body()).decode()).items()}
        client = self.clients.get(form.get("client_id", ""))
        if client is None or client.get("client_secret", "") != form.get("client_secret", ""):
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        if form.get("resource") != self.resource:
            return JSONResponse({"error": "invalid_target"}, status_code=400)  # RFC 8707 section 2.2
        if form.get("grant_type") == "authorization_code":
            grant = self.codes.pop(form.get("code", ""), None)  # single use (OAuth 2.1 section 4.1.3)
            verifier = form.get("code_verifier", "").encode()
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
            if grant is None or grant.redirect_uri != form.get("redirect_uri") or grant.code_challenge != challenge:
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
        elif form.get("grant_type") == "refresh_token":
            grant = self.refresh_grants.get(form.get("refresh_token", ""))
            if grant is None:
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
        else:
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        if grant.client_id != client["client_id"] or grant.resource != form["resource"]:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        return JSONResponse(self._issue(form["grant_type"], grant), headers={"Cache-Control": "no-store"})

    def _issue(self, grant_type: str, grant: Grant) -> dict[str, Any]:
        # RFC 6749 section 3.3: the server may grant less than asked, and then says what it granted.
        granted = [scope for scope in grant.scopes if scope != NEVER_GRANTED]
        self.token_requests.append((grant_type, granted))
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": grant.resource,  # RFC 8707 section 2: the audience is the resource asked for
            "sub": USER,
            "client_id": grant.client_id,
            "scope": " ".join(granted),  # RFC 9068 section 2.2.3
            "iat": now,
            "exp": now + 3600,
            "jti": secrets.token_hex(16),
        }
        access_token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid, "typ": "at+jwt"})
        answer = {"access_token": access_token, "token_type": "Bearer", "expires_in": 3600, "scope": " ".join(granted)}
        self.issued.add(access_token)
        if self.refresh_tokens:
            answer["refresh_token"] = refresh_token = secrets.token_urlsafe(32)
            self.refresh_grants[refresh_token] = Grant(grant.client_id, granted, grant.resource)
            self.issued.add(refresh_token)
        return answer

    async def jwks(self, request: Request) -> Response:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return JSONResponse({"keys": [{**public, "kid": self.kid, "use": "sig", "alg": "RS256"}]})


# --- the MCP server under test ----------------------------------------------------


@dataclass
class Exchange:
    """One request to the MCP server and its response's status and challenge, as they went over the wire."""

    method: str
    path: str
    status: int
    challenge: str | None


def projects_app(ran: list[str]) -> Any:
    """The SDK's streamable HTTP app with three tools; each appends its name to ``ran`` when it runs."""
    server = Server("projects")

    @server.tool()
    def list_projects() -> str:
        ran.append("list_projects")
        return "apollo gemini"

    @server.tool()
    def delete_project(name: str) -> str:
        ran.append("delete_project")
        return f"deleted {name}"

    @server.tool()
    def forbidden() -> str:
        ran.append("forbidden")
        return "this needs a scope nobody is granted"

    return server.streamable_http_app()


def on_the_wire(app: Any, exchanges: list[Exchange]) -> Any:
    """The outermost layer: notes each HTTP exchange, as the client sees it."""

    async def noted(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def note(message: Any) -> None:
            if message["type"] == "http.response.start":
                challenge = dict(message.get("headers") or []).get(b"www-authenticate")
                text = challenge.decode() if challenge else None
                exchanges.append(Exchange(scope["method"], scope["path"], message["status"], text))
            await send(message)

        await app(scope, receive, note)

    return noted


@dataclass
class Deployment:
    authorization_server: AuthorizationServer
    url: str  # the MCP endpoint, which is also the RFC 8707 resource
    ran: list[str]
    exchanges: list[Exchange]

    @property
    def secrets(self) -> set[str]:
        """Every secret in play: what the authorization server handed out, and the API key."""
        return {*self.authorization_server.issued, API_KEY}

    def refusals(self) -> list[Exchange]:
        """The 403s the MCP endpoint answered."""
        return [exchange for exchange in self.exchanges if exchange.path == "/mcp" and exchange.status == 403]

    @property
    def metadata_url(self) -> str:
        """RFC 9728 section 3.1: the well-known suffix goes between the host and the resource's path."""
        base = self.url.removesuffix("/mcp")
        return f"{base}/.well-known/oauth-protected-resource/mcp"


def listening() -> tuple[socket.socket, str]:
    """A listener on a free loopback port, and its base URL: the apps must know their URLs before serving."""
    listener = loopback_listener()
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    as_listener, issuer = listening()
    mcp_listener, base = listening()
    resource = f"{base}/mcp"
    authorization_server = AuthorizationServer(issuer=issuer, resource=resource)
    ran: list[str] = []
    exchanges: list[Exchange] = []
    provider = ProviderChain(
        StaticTokenProvider({API_KEY: API_KEY_CLAIMS}),
        JWTProvider(issuer=issuer, audience=resource, jwks_url=f"{issuer}/jwks", algorithms=["RS256"]),
    )
    guarded = BearerAuthMiddleware(
        projects_app(ran),
        provider,
        resource=resource,
        authorization_servers=[issuer],
        required_scopes=REQUIRED,
        operation_scopes=OPERATION_SCOPES,
        scopes_supported=SCOPES_SUPPORTED,
    )
    deployment = Deployment(authorization_server, resource, ran, exchanges)
    try:
        with serve(authorization_server.app(), as_listener), serve(on_the_wire(guarded, exchanges), mcp_listener):
            yield deployment
    finally:
        SECRETS.update(deployment.secrets)  # conftest.py's end-of-run scan looks for them in every record too


@pytest.fixture
def logs() -> Iterator[list[logging.LogRecord]]:
    """Every record of every logger during the test, any level, from any thread."""
    handler, root = ListHandler(), logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.NOTSET)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def assert_none_logged(records: list[logging.LogRecord], secret_values: set[str]) -> None:
    """No token, code, refresh token or client secret in any record; the failure names the logger only."""
    for record in records:
        text = record_text(record)
        leaked = any(secret in text for secret in secret_values)
        assert not leaked, f"a secret reached the log of {record.name!r} (not shown here either)"


# --- the SDK's client --------------------------------------------------------------


class MemoryStorage:
    """The SDK's TokenStorage, in memory: one client's tokens and registration."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


class Browser:
    """Stands in for the user's browser: opens the authorization URL, reads where it is sent back to."""

    def __init__(self) -> None:
        self.redirect: dict[str, str] = {}

    async def open(self, authorization_url: str) -> None:
        # http.client, which logs nothing: the code travels in the redirect's Location by design (RFC 6749
        # section 4.1.2; PKCE makes that safe), and an HTTP library's DEBUG trace of it is no leak of ours.
        status, location = await anyio.to_thread.run_sync(redirect_of, authorization_url)
        assert status == 302, status
        sent_back = urlsplit(location)
        assert f"{sent_back.scheme}://{sent_back.netloc}{sent_back.path}" == REDIRECT_URI
        self.redirect = {name: values[0] for name, values in parse_qs(sent_back.query).items()}
        assert "error" not in self.redirect, self.redirect["error"]

    async def callback(self) -> Any:
        """The redirect's code and state (and on mcp 2.x its RFC 9207 issuer), as the SDK's callback answers."""
        code, state = self.redirect["code"], self.redirect.get("state")
        if MCP_MAJOR == 1:
            return code, state
        return AuthorizationCodeResult(code=code, state=state, iss=self.redirect.get("iss"))


def redirect_of(url: str) -> tuple[int, str]:
    """GET ``url`` without following a redirect: the status and the Location."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request("GET", f"{parts.path}?{parts.query}")
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("location", "")
    finally:
        connection.close()


def oauth_provider(url: str, storage: MemoryStorage | None = None) -> OAuthClientProvider:
    browser = Browser()
    metadata = OAuthClientMetadata(
        client_name="step-up test",
        redirect_uris=[REDIRECT_URI],  # type: ignore[list-item]
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        token_endpoint_auth_method="client_secret_post",
    )
    return OAuthClientProvider(
        url, metadata, storage or MemoryStorage(), redirect_handler=browser.open, callback_handler=browser.callback
    )


async def refusal_seen_by(
    url: str, generation: str, tool: str, arguments: dict[str, Any] | None = None, **http_options: Any
) -> BaseException:
    """The error a caller of ``tool`` gets, wherever the SDK raises it.

    mcp 2.x turns the refused POST into an error response to the call, and the client carries on;
    mcp 1.x's transport raises httpx's HTTPStatusError in its own task, which ends the client.
    """
    try:
        async with sdk_client(url, generation, **http_options) as caller:
            await caller.call_tool(tool, arguments or {})
    except Exception as error:  # not BaseException: a cancellation, fail_after's included, must go on up
        leaves = list(leaves_of(error))
        return next((leaf for leaf in leaves if isinstance(leaf, (MCPError, httpx.HTTPStatusError))), error)
    raise AssertionError(f"{tool} was not refused")


def leaves_of(error: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, as task groups raise them."""
    inner = getattr(error, "exceptions", None)
    if inner is None:
        yield error
    else:
        for exception in inner:
            yield from leaves_of(exception)


def is_the_sdks_word_for_a_403(error: BaseException) -> bool:
    if isinstance(error, httpx.HTTPStatusError):
        return bool(error.response.status_code == 403)
    return isinstance(error, MCPError)


def text_of(result: Any) -> str:
    assert not (getattr(result, "is_error", None) or getattr(result, "isError", None)), result
    return str(result.content[0].text)


def raw_post(url: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP/1.1 POST: what any client on the wire sees, without an SDK's reading of it."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=20)
    try:
        connection.request("POST", parts.path, body=json.dumps(body).encode(), headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def assert_step_up_challenge(www_authenticate: str | None, scopes: str, deployment: Deployment) -> None:
    """The challenge MCP 2026-07-28 asks of a 403 (Scope Challenge Handling): every scope the operation needs."""
    assert www_authenticate is not None
    found = parameters(www_authenticate)
    wanted = {"error": "insufficient_scope", "scope": scopes, "resource_metadata": deployment.metadata_url}
    assert {name: found.get(name) for name in wanted} == wanted
    assert found.get("error_description")


def parameters(www_authenticate: str) -> dict[str, str]:
    """RFC 9110 section 11.6.1 auth-params of one Bearer challenge (quoted strings without escapes, as ours are)."""
    scheme, _, rest = www_authenticate.partition(" ")
    assert scheme == "Bearer", www_authenticate
    found: dict[str, str] = {}
    for part in rest.split('", '):
        name, _, value = part.partition("=")
        found[name.strip()] = value.strip('"')
    return found


# --- the tests -----------------------------------------------------------------------


@pytest.mark.parametrize("generation", GENERATIONS)
async def test_the_sdk_client_steps_up_to_the_union_of_scopes_and_the_tool_runs_once(
    deployment: Deployment, generation: str, logs: list[logging.LogRecord]
) -> None:
    authorization_server = deployment.authorization_server
    with anyio.fail_after(WAIT):
        async with sdk_client(deployment.url, generation, auth=oauth_provider(deployment.url)) as caller:
            # The 401 challenge names the required scopes, so the first authorization asks for those alone.
            assert authorization_server.authorizations == [REQUIRED]
            assert text_of(await caller.call_tool("list_projects", {})) == "apollo gemini"
            assert len(authorization_server.authorizations) == 1

            assert text_of(await caller.call_tool("delete_project", {"name": "apollo"})) == "deleted apollo"

    [refusal] = deployment.refusals()
    assert_step_up_challenge(refusal.challenge, "mcp:tools projects:delete", deployment)
    # The step-up asks for exactly the union of what was granted and what was challenged.
    assert authorization_server.authorizations == [REQUIRED, ["mcp:tools", "projects:delete"]]
    assert authorization_server.token_requests == [
        ("authorization_code", REQUIRED),
        ("authorization_code", ["mcp:tools", "projects:delete"]),
    ]
    assert len(authorization_server.clients) == 1  # one registration: the step-up reuses it
    assert deployment.ran.count("delete_project") == 1
    assert_none_logged(logs, deployment.secrets)


@pytest.mark.parametrize("generation", GENERATIONS)
async def test_after_a_restart_a_stored_token_steps_up_by_discovering_again_and_keeps_its_grant(
    deployment: Deployment, generation: str, logs: list[logging.LogRecord]
) -> None:
    """A client holding only a stored token knows no authorization server, so the 403 sends it to the
    protected resource metadata (RFC 9728) first; the stored grant is kept in what it asks for.

    The SDK would find the metadata without the challenge's resource_metadata too: its fallback,
    the well-known URL built from the server URL (RFC 9728 section 3.1), is where mcp_bearer serves it."""
    authorization_server = deployment.authorization_server
    storage = MemoryStorage()
    with anyio.fail_after(WAIT):
        async with sdk_client(deployment.url, generation, auth=oauth_provider(deployment.url, storage)) as caller:
            assert text_of(await caller.call_tool("list_projects", {})) == "apollo gemini"
        before_restart = len(deployment.exchanges)
        async with sdk_client(deployment.url, generation, auth=oauth_provider(deployment.url, storage)) as caller:
            assert text_of(await caller.call_tool("delete_project", {"name": "gemini"})) == "deleted gemini"

    after_restart = deployment.exchanges[before_restart:]
    [refusal] = deployment.refusals()
    assert_step_up_challenge(refusal.challenge, "mcp:tools projects:delete", deployment)
    metadata_path = urlsplit(deployment.metadata_url).path
    assert after_restart.index(refusal) < after_restart.index(Exchange("GET", metadata_path, 200, None))
    assert authorization_server.authorizations == [REQUIRED, ["mcp:tools", "projects:delete"]]
    assert len(authorization_server.clients) == 1  # the stored registration is reused
    assert deployment.ran.count("delete_project") == 1
    assert_none_logged(logs, deployment.secrets)


@pytest.mark.parametrize("generation", GENERATIONS)
async def test_a_scope_the_server_never_grants_ends_in_an_error_not_a_loop(
    deployment: Deployment, generation: str, logs: list[logging.LogRecord]
) -> None:
    authorization_server = deployment.authorization_server
    with anyio.fail_after(WAIT):
        error = await refusal_seen_by(deployment.url, generation, "forbidden", auth=oauth_provider(deployment.url))
    assert is_the_sdks_word_for_a_403(error), repr(error)

    # One step-up, granted less than it asked for; the retry is refused again and the caller told.
    assert authorization_server.authorizations == [REQUIRED, ["mcp:tools", NEVER_GRANTED]]
    assert authorization_server.token_requests == [("authorization_code", REQUIRED)] * 2
    refusals = deployment.refusals()
    assert len(refusals) == 2
    for refusal in refusals:
        assert_step_up_challenge(refusal.challenge, f"mcp:tools {NEVER_GRANTED}", deployment)
    assert "forbidden" not in deployment.ran
    assert_none_logged(logs, deployment.secrets)


@pytest.mark.parametrize("generation", GENERATIONS)
async def test_an_api_key_without_the_scope_is_refused_403_and_cannot_step_up(
    deployment: Deployment, generation: str, logs: list[logging.LogRecord]
) -> None:
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "delete_project", "arguments": {"name": "apollo"}},
    }
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": generation,
    }
    if generation == MODERN:  # 2026-07-28 mirrors the method and the name into headers
        headers |= {"Mcp-Method": "tools/call", "Mcp-Name": "delete_project"}
    status, response_headers, body = raw_post(deployment.url, headers, call)
    assert status == 403
    assert_step_up_challenge(response_headers.get("www-authenticate"), "mcp:tools projects:delete", deployment)
    assert json.loads(body).items() >= {"error": "insufficient_scope", "scope": "mcp:tools projects:delete"}.items()

    # Through the SDK's client with the key as a static header: what the key may do works, the rest is an error.
    static = {"Authorization": f"Bearer {API_KEY}"}
    with anyio.fail_after(WAIT):
        async with sdk_client(deployment.url, generation, headers=static) as caller:
            assert text_of(await caller.call_tool("list_projects", {})) == "apollo gemini"
        error = await refusal_seen_by(deployment.url, generation, "delete_project", {"name": "apollo"}, headers=static)
    assert is_the_sdks_word_for_a_403(error), repr(error)
    assert deployment.ran.count("delete_project") == 0
    assert deployment.authorization_server.authorizations == []  # no OAuth: nowhere to step up to
    assert_none_logged(logs, deployment.secrets)


def node_with_the_typescript_sdk() -> str:
    """node, with ts_client's lockfile installed (npm ci, the first time), so that pytest alone runs this test."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "the TypeScript client tests need Node.js 20 or newer and npm on PATH"
    installed = TS_CLIENT / "node_modules" / "@modelcontextprotocol"
    if not ((installed / "client").is_dir() and (installed / "sdk").is_dir()):
        npm_ci = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=TS_CLIENT, capture_output=True, text=True, timeout=300
        )
        assert npm_ci.returncode == 0, npm_ci.stderr[-2000:]
    return node


DELETE = [*REQUIRED, "projects:delete"]  # what the step-up for delete_project asks for
UNION_WITH_NEVER = [*DELETE, NEVER_GRANTED]  # what a client that keeps its grants asks for forbidden


@pytest.mark.parametrize(
    ("package", "generation", "refresh_tokens", "authorizations", "refused_by"),
    [
        # v2 asks for the union and, since a refresh cannot widen a grant (RFC 6749 section 6), authorizes
        # anew even with a refresh token in hand. forbidden costs one authorization per attempt, the app's
        # retry included; the redirect that retry starts is the UnauthorizedError the caller sees.
        pytest.param(
            "@modelcontextprotocol/client",
            MODERN,
            True,
            [REQUIRED, DELETE, UNION_WITH_NEVER, UNION_WITH_NEVER],
            "UnauthorizedError",
            marks=pytest.mark.modern_only,  # an mcp 1.x server speaks no 2026-07-28
        ),
        (
            "@modelcontextprotocol/client",
            LEGACY,
            True,
            [REQUIRED, DELETE, UNION_WITH_NEVER, UNION_WITH_NEVER],
            "UnauthorizedError",
        ),
        # v1 asks for the challenged scopes alone, so it steps up only because the challenge names all the
        # operation needs, and the retry of forbidden meets the same challenge, where it stops. Holding a
        # refresh token it refreshes instead of authorizing and gives up (typescript-sdk issue 2255), so
        # its authorization server here issues none.
        (
            "@modelcontextprotocol/sdk",
            LEGACY,
            False,
            [REQUIRED, DELETE, [*REQUIRED, NEVER_GRANTED]],
            "StreamableHTTPError",
        ),
    ],
    ids=["v2-client-2026-07-28", "v2-client-2025-11-25", "v1-sdk-2025-11-25"],
)
def test_the_typescript_sdk_clients_step_up_once_and_stop_at_a_scope_never_granted(
    deployment: Deployment,
    package: str,
    generation: str,
    refresh_tokens: bool,
    authorizations: list[list[str]],
    refused_by: str,
    logs: list[logging.LogRecord],
) -> None:
    node = node_with_the_typescript_sdk()
    authorization_server = deployment.authorization_server
    authorization_server.refresh_tokens = refresh_tokens
    command = [node, "step_up.mjs", package, generation, deployment.url, authorization_server.issuer, REDIRECT_URI]
    ran = subprocess.run(command, cwd=TS_CLIENT, capture_output=True, text=True, timeout=WAIT)
    assert not any(secret in ran.stdout + ran.stderr for secret in deployment.secrets), "the client printed a secret"
    assert ran.returncode == 0, ran.stdout + ran.stderr[-2000:]
    report = json.loads(ran.stdout)

    assert report["protocolVersion"] == generation
    assert (report["list"], report["delete"]) == ("apollo gemini", "deleted apollo")
    assert report["forbidden"]["name"] == refused_by
    assert authorization_server.authorizations == authorizations
    assert report["authorizations"] == len(authorizations)
    assert deployment.ran.count("delete_project") == 1 and "forbidden" not in deployment.ran
    for refusal in deployment.refusals():
        assert refusal.challenge is not None and "insufficient_scope" in refusal.challenge
    assert_none_logged(logs, deployment.secrets)
