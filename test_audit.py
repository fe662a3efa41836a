"""The audit trail: one INFO record per decision about a token, for people and for JSON
formatters alike, never a token in it."""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
from typing import Any

import anyio
import pytest

from mcp_bearer import (
    AccessToken,
    BearerAuthMiddleware,
    ProviderChain,
    ProviderUnavailable,
    StaticTokenProvider,
    principal_key,
)
from support import (
    ALICE_1,
    BOB,
    CAROL_NO_SUB,
    PREFLIGHT,
    SECRETS,
    TOKENS,
    FakeProvider,
    Harness,
    Receive,
    Scope,
    Send,
    api_key_principal,
    bearer,
    call_json,
    claims_echo,
    mcp_app,
    mcp_bearer_log,
    mcp_session,
    opaque,
    serve,
    whoami,
)

DOWN = opaque("down")  # its provider cannot decide: 503
AUDIT_FIELDS = ("outcome", "status", "error", "method", "path", "client", "principal", "reason")  # record.mcp_bearer


def audit_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What an audit record carries for formatters (``extra={"mcp_bearer": ...}``)."""
    fields: dict[str, Any] = vars(record)["mcp_bearer"]
    return fields


def audit_provider() -> ProviderChain:
    return ProviderChain(StaticTokenProvider(TOKENS), FakeProvider({DOWN: ProviderUnavailable("IdP down")}))


def request_from(base: str, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """One plain HTTP/1.1 request; returns (status, "127.0.0.1:PORT" it came from)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        connection.connect()
        client = ":".join(map(str, connection.sock.getsockname()[:2]))
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status, client
    finally:
        connection.close()


def own_principal(token: str) -> str:
    """A token without sub is its own principal, named by a keyed digest: never a plain hash of the token."""
    key = principal_key(AccessToken(token, {}))
    assert key is not None and hashlib.sha256(token.encode()).hexdigest()[:12] not in key
    return key


@pytest.mark.slow
def test_e2e_audit_trail_of_a_mixed_run() -> None:
    """One INFO record per decision, for people and for JSON formatters alike; never a token."""
    reached: list[str] = []  # the client address of every request the app was given

    async def noting(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            reached.append(":".join(map(str, scope["client"])))
        await inner(scope, receive, send)

    inner = mcp_app(whoami)
    app = BearerAuthMiddleware(noting, audit_provider(), audit=True, required_scopes=["write"])

    async def whoami_over_mcp(url: str) -> Any:
        async with mcp_session(url, BOB) as (session, _):
            return await call_json(session, "whoami")

    # (token or header, path) -> what the trail must say. A token the provider did not vouch for is
    # named by nothing derived from it: a digest in the trail could confirm a guessed password.
    refused = [
        (None, "/mcp", "401 unauthorized", None, None),
        ("sk-nobody-Zq8Lm3Wx5Rt", "/mcp", "401 invalid_token", None, "unknown API key"),
        (ALICE_1, "/mcp", "403 insufficient_scope", api_key_principal("alice"), None),  # read, not write
        (CAROL_NO_SUB, "/mcp", "403 insufficient_scope", own_principal(CAROL_NO_SUB), None),  # no sub
        (DOWN, "/mcp", "503 temporarily_unavailable", None, None),
        ("a b", "/mcp", "400 invalid_request", None, None),  # malformed: no token to name
        (None, "/mcp%0d%0aforged", "401 unauthorized", None, None),  # an encoded CR LF in the path
    ]
    SECRETS.add("sk-nobody-Zq8Lm3Wx5Rt")
    expected = []
    with mcp_bearer_log("mcp_bearer.audit") as records, serve(app) as base:
        for token, path, outcome, principal, reason in refused:
            status, client = request_from(base, "POST", path, {"Authorization": f"Bearer {token}"} if token else {})
            code, _, error = outcome.partition(" ")
            assert status == int(code)
            decoded = path.replace("%0d%0a", "\r\n")
            expected.append((outcome, int(code), error, "POST", decoded, client, principal, reason))
        assert len(records) == len(refused)  # each written before its response, refusals included
        assert anyio.run(whoami_over_mcp, base + "/mcp")["claims"]["sub"] == "bob"
    denied, allowed = records[: len(refused)], records[len(refused) :]
    assert [tuple(audit_fields(r)[k] for k in AUDIT_FIELDS) for r in denied] == expected
    assert len(allowed) == len(reached) and len(allowed) >= 2  # initialize, tools/call, ... : one record each
    for record in allowed:
        fields = audit_fields(record)
        assert (fields["outcome"], fields["status"], fields["error"], fields["reason"]) == ("allowed", None, None, None)
        assert (fields["path"], fields["principal"]) == ("/mcp", api_key_principal("bob")) and fields["method"] in (
            "POST",
            "GET",
            "DELETE",
        )
    assert sorted(audit_fields(r)["client"] for r in allowed) == sorted(reached)
    used = [BOB, ALICE_1, CAROL_NO_SUB, DOWN, "sk-nobody-Zq8Lm3Wx5Rt"]
    for record in records:
        fields = audit_fields(record)
        assert (record.name, record.levelno, set(fields)) == ("mcp_bearer.audit", logging.INFO, set(AUDIT_FIELDS))
        assert re.fullmatch(r"127\.0\.0\.1:\d+", fields["client"])
        message = record.getMessage()
        outcome, method, path, client, principal, reason = (
            fields[k] for k in AUDIT_FIELDS if k not in ("status", "error")
        )
        because = "" if reason is None else f", reason {reason!r}"  # every field a client or IdP supplies, quoted
        assert message == f"{outcome}: {method!r} {path!r} from {client!r}, principal {principal!r}{because}"
        assert "\n" not in logging.Formatter().format(record) and "\r" not in message  # no forged second line
        assert not [t for t in used if t in message or t in repr(vars(record))]


def test_audit_is_off_by_default_and_must_be_a_bool() -> None:
    with mcp_bearer_log("mcp_bearer.audit") as records:
        harness = Harness(audit_provider(), required_scopes=["read"])
        statuses = [
            harness.request(headers).status for headers in ([], bearer(BOB), bearer(CAROL_NO_SUB), bearer(DOWN))
        ]
        assert statuses == [401, 200, 403, 503]
        assert records == []
        audited = Harness(audit_provider(), audit=True)  # without required scopes, a token without sub gets in
        assert audited.request(bearer(CAROL_NO_SUB)).status == 200
        assert [audit_fields(r)["principal"] for r in records] == [own_principal(CAROL_NO_SUB)]
    for wrong in ("yes", 1, None):
        with pytest.raises(TypeError, match="audit must be True or False"):
            BearerAuthMiddleware(claims_echo, audit_provider(), audit=wrong)  # type: ignore[arg-type]


def test_audit_records_decisions_about_tokens_only() -> None:
    """Public paths, the metadata document and CORS preflights decide nothing about a token: no record."""
    with mcp_bearer_log("mcp_bearer.audit") as records:
        harness = Harness(audit_provider(), audit=True, resource="https://mcp.example.com/mcp")
        assert harness.request(path="/health", method="GET").status == 200
        assert harness.request(path="/.well-known/oauth-protected-resource", method="GET").status == 200
        assert harness.request(PREFLIGHT, method="OPTIONS").status == 204
        assert records == []
        assert harness.request(method="OPTIONS").status == 401  # not a real preflight: a decision
        assert [audit_fields(r)["outcome"] for r in records] == ["401 unauthorized"]
