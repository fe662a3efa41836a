"""The MCP authorization spec: expiry, scopes (RFC 6750 3.1 insufficient_scope) and the RFC 9728
protected resource metadata, directly and end to end with the SDK's own OAuth client."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from mcp_bearer import (
    AccessToken,
    AuthenticationError,
    BearerAuthMiddleware,
    InsufficientScopeError,
    require_scopes,
)
from support import (
    ALICE_1,
    BOB,
    CHALLENGE_INVALID,
    INITIALIZE,
    INVALID_TOKEN,
    MCP_POST_HEADERS,
    FakeProvider,
    Harness,
    bearer,
    loopback_listener,
    mcp_app,
    mcp_session,
    raw_request,
    serve,
    whoami,
)

# --- expiry and scopes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expiry", "status"),
    [("never", 200), ("future", 200), ("past", 401), ("epoch", 401), ("nan", 401)],
    ids=["never", "future", "past", "epoch", "nan"],
)
def test_expired_token_is_refused_even_when_the_provider_returned_it(expiry: str, status: int) -> None:
    # Relative to when the middleware checks, not to when the tests were collected a while before.
    now = time.time()
    expires_at = {"never": None, "future": now + 60, "past": now - 1, "epoch": 0.0, "nan": float("nan")}[expiry]
    outcome = Harness(FakeProvider(otherwise=AccessToken(BOB, expires_at=expires_at))).request(bearer(BOB))
    assert outcome.status == status
    if status == 401:
        assert outcome.json() == INVALID_TOKEN and outcome.header("www-authenticate") == CHALLENGE_INVALID
        assert outcome.app_calls == []


@pytest.mark.parametrize(
    ("granted", "status"),
    [(["read", "write"], 200), (["write", "admin", "read"], 200), (["read"], 403), ([], 403), ("read write", 403)],
)
def test_required_scopes_answer_403_insufficient_scope(granted: Any, status: int) -> None:
    outcome = Harness(
        FakeProvider(otherwise=AccessToken(BOB, scopes=granted)), required_scopes=["read", "write"]
    ).request(bearer(BOB))
    assert outcome.status == status
    if status == 403:
        assert outcome.json() == {
            "error": "insufficient_scope",
            "error_description": "Insufficient scope",
            "scope": "read write",
        }
        assert outcome.header("www-authenticate") == (
            'Bearer error="insufficient_scope", scope="read write", error_description="Insufficient scope"'
        )
        assert outcome.app_calls == []


def test_required_scopes_join_every_401_challenge() -> None:
    harness = Harness(required_scopes=["read"])
    assert harness.request([]).header("www-authenticate") == 'Bearer scope="read"'
    assert harness.request(bearer("sk-nobody")).header("www-authenticate") == (
        'Bearer error="invalid_token", scope="read", error_description="Token is invalid or expired"'
    )


def test_require_scopes_in_a_tool() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(require_scopes("read"))
        with pytest.raises(InsufficientScopeError) as caught:
            require_scopes("read", "admin", "write")
        seen.append(caught.value)
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    harness = Harness()
    harness.middleware = BearerAuthMiddleware(app, harness.provider)
    assert harness.request(bearer(ALICE_1)).status == 204
    token, error = seen
    assert token.token == ALICE_1
    assert error.missing_scopes == ("admin", "write") and isinstance(error, AuthenticationError)
    assert "admin write" in str(error)


# --- RFC 9728 protected resource metadata and the challenges that point to it -----------


METADATA_OPTIONS: dict[str, Any] = {
    "resource": "https://mcp.example.com/mcp",
    "authorization_servers": ["https://auth.example.com"],
    "required_scopes": ["mcp:tools"],
    "resource_name": "Example MCP",
}


@pytest.mark.parametrize("path", ["/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"])
def test_protected_resource_metadata_is_served_unauthenticated(path: str) -> None:
    harness = Harness(**METADATA_OPTIONS)
    outcome = harness.request([], path=path, method="GET")
    assert outcome.status == 200 and harness.app_calls == [] and outcome.provider_calls == []
    assert outcome.json() == {
        "resource": "https://mcp.example.com/mcp",
        "authorization_servers": ["https://auth.example.com"],
        "scopes_supported": ["mcp:tools"],
        "bearer_methods_supported": ["header"],
        "resource_name": "Example MCP",
    }
    assert outcome.header("cache-control") == "public, max-age=3600"
    assert outcome.header("content-type") == "application/json"
    head = harness.request([], path=path, method="HEAD")
    assert head.status == 200 and head.body == b"" and head.header("content-length") == str(len(outcome.body))


def test_metadata_paths_are_exact_and_other_methods_are_guarded() -> None:
    harness = Harness(**METADATA_OPTIONS)
    for path in ("/.well-known/oauth-protected-resource/", "/.well-known/oauth-protected-resource/other"):
        assert harness.request([], path=path, method="GET").status == 401
    assert harness.request([], path="/.well-known/oauth-protected-resource", method="POST").status == 401
    # Without resource= there is no metadata, and no OAuth: a probing OAuth client gets 404, not 401.
    assert Harness().request([], path="/.well-known/oauth-protected-resource", method="GET").status == 404


def test_scopes_supported_can_differ_from_required_scopes() -> None:
    harness = Harness(resource="https://x.example/", scopes_supported=["a", "b"])
    outcome = harness.request([], path="/.well-known/oauth-protected-resource", method="GET")
    assert outcome.json()["scopes_supported"] == ["a", "b"] and "resource_name" not in outcome.json()
    assert harness.request([]).header("www-authenticate") == (
        'Bearer resource_metadata="https://x.example/.well-known/oauth-protected-resource"'
    )


def test_every_challenge_names_realm_scope_and_resource_metadata() -> None:
    harness = Harness(realm='mcp "prod" \\ eu', **METADATA_OPTIONS)
    url = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
    realm = 'realm="mcp \\"prod\\" \\\\ eu"'
    assert (
        harness.request([]).header("www-authenticate")
        == f'Bearer {realm}, scope="mcp:tools", resource_metadata="{url}"'
    )
    assert harness.request(bearer("sk-nobody")).header("www-authenticate") == (
        f'Bearer {realm}, error="invalid_token", scope="mcp:tools", '
        f'error_description="Token is invalid or expired", resource_metadata="{url}"'
    )
    assert harness.request(bearer(BOB)).header("www-authenticate") == (  # BOB lacks mcp:tools
        f'Bearer {realm}, error="insufficient_scope", scope="mcp:tools", '
        f'error_description="Insufficient scope", resource_metadata="{url}"'
    )


# --- end to end: the metadata over HTTP, followed by the SDK's OAuth client -------------


def listener_and_url() -> tuple[socket.socket, str]:
    listener = loopback_listener()
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


def recording(app: Any, seen: list[tuple[str, str]]) -> Any:
    """Outermost ASGI layer that notes (method, path) of every HTTP request."""

    async def record(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append((scope["method"], scope["path"]))
        await app(scope, receive, send)

    return record


@pytest.mark.slow
def test_e2e_metadata_document_over_http() -> None:
    listener, base = listener_and_url()
    app = BearerAuthMiddleware(
        mcp_app(whoami), FakeProvider(), resource=base + "/mcp", authorization_servers=["https://auth.example.com"]
    )
    with serve(app, listener) as base:
        for path in ("/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"):
            status, headers, body = raw_request(base, "GET", path)
            assert status == 200 and headers["cache-control"] == "public, max-age=3600"
            assert json.loads(body) == {
                "resource": base + "/mcp",
                "authorization_servers": ["https://auth.example.com"],
                "bearer_methods_supported": ["header"],
            }
        status, headers, body = raw_request(base, "POST", "/mcp", MCP_POST_HEADERS, INITIALIZE)
        assert status == 401
        assert (
            headers["www-authenticate"] == f'Bearer resource_metadata="{base}/.well-known/oauth-protected-resource/mcp"'
        )


class _NoStorage:
    async def get_tokens(self) -> None:
        return None

    async def set_tokens(self, tokens: Any) -> None:
        pass

    async def get_client_info(self) -> None:
        return None

    async def set_client_info(self, info: Any) -> None:
        pass


async def _not_found(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.slow
@pytest.mark.anyio
async def test_e2e_sdk_oauth_client_follows_resource_metadata_to_the_authorization_server() -> None:
    """The SDK's own 401 handling reads resource_metadata, fetches our document, then asks its issuer."""
    from mcp.client.auth import OAuthClientProvider
    from mcp.shared.auth import OAuthClientMetadata

    seen_here: list[tuple[str, str]] = []
    seen_by_issuer: list[tuple[str, str]] = []
    listener, base = listener_and_url()
    with serve(recording(_not_found, seen_by_issuer)) as issuer:
        guarded = BearerAuthMiddleware(
            mcp_app(whoami), FakeProvider(), resource=base + "/mcp", authorization_servers=[issuer]
        )
        with serve(recording(guarded, seen_here), listener):
            oauth = OAuthClientProvider(
                base + "/mcp",
                OAuthClientMetadata.model_validate({"redirect_uris": ["http://127.0.0.1:1/cb"]}),
                _NoStorage(),
            )
            with pytest.raises(BaseException):  # noqa: B017 - no real issuer: the flow must stop
                async with mcp_session(base + "/mcp", None, auth=oauth, timeout=20):
                    pass
    assert seen_here[:2] == [("POST", "/mcp"), ("GET", "/.well-known/oauth-protected-resource/mcp")]
    metadata = oauth.context.protected_resource_metadata
    assert metadata is not None and str(metadata.resource) == base + "/mcp"
    assert ("GET", "/.well-known/oauth-authorization-server") in seen_by_issuer
