"""Per-operation authorization: ``operation_scopes`` judged on the body the app will act on, however the
request is shaped; ``scope_implies`` (scope hierarchies); ``allowed_origins``. Direct tests with hand-built
scopes first, then the SDK's own apps under uvicorn, whose tools count how often they really ran.

MCP 2026-07-28, Authorization: a token that lacks an operation's scopes gets 403 ``insufficient_scope``
naming every scope it needs (Scope Challenge Handling); Streamable HTTP: ``Mcp-Method``/``Mcp-Name``
mirror the body, and a present Origin that is not allowed gets 403.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import fnmatch
import http.client
import importlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_bearer import (
    AccessToken,
    BearerAuthMiddleware,
    InsufficientScopeError,
    Operation,
    require_scopes,
)
from support import (
    MCP_MAJOR,
    MCP_POST_HEADERS,
    PREFLIGHT,
    SECRETS,
    SERVER_ERROR,
    FakeProvider,
    Harness,
    Headers,
    Message,
    Outcome,
    Receive,
    Scope,
    Send,
    Server,
    bearer,
    call_json,
    httpx,
    mcp_app,
    mcp_bearer_log,
    mcp_session,
    never_receive,
    raw_request,
    serve,
    tool_text,
)

# --- callers, rules and the answers they earn -------------------------------------------------

READER = "sk-ops-reader-7Qe2Lw9Rt4Yu1Io6"
WRITER = "sk-ops-writer-3Mn8Bv5Cx2Zl7Kj4"
DELETER = "sk-ops-deleter-9Hg4Fd1Sa6Pq3We8"
ADMIN = "sk-ops-admin-2Tr7Ey4Ui9Op5As1"
BARE = "sk-ops-bare-6Df3Gh8Jk1Lz4Xc7"  # the required scope, nothing more
OUTSIDER = "sk-ops-outsider-5Vb2Nm7Qw4Er9Ty"  # not even the required scope
SCOPES = {
    READER: ["mcp", "projects:read"],
    WRITER: ["mcp", "projects:read", "projects:write"],
    DELETER: ["mcp", "projects:read", "projects:delete"],
    ADMIN: ["mcp", "projects:read", "projects:write", "projects:delete", "admin", "prompts"],
    BARE: ["mcp"],
    OUTSIDER: [],
}
OPS_TOKENS = {token: {"sub": token.split("-")[2], "scopes": scopes} for token, scopes in SCOPES.items()}
SECRETS.update(OPS_TOKENS)

RULES: dict[str, list[str]] = {
    "tools/call read_*": ["projects:read"],
    "tools/call write_*": ["projects:write"],
    "tools/call delete_*": ["projects:delete"],
    "tools/call *_admin": ["admin"],
    "resources/read file:///admin/*": ["admin"],
    "resources/subscribe file:///admin/*": ["admin"],
    "prompts/get": ["prompts"],
}
REQUIRED = ["mcp"]
RESOURCE = "https://mcp.example.com/mcp"
METADATA = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
UNREADABLE = {
    "error": "invalid_request",
    "error_description": "Request body is not a JSON-RPC message this server can read",
}
TOO_LARGE = {"error": "request_too_large", "error_description": "Request body is too large"}
BAD_ORIGIN = {"error": "invalid_origin", "error_description": "Origin not allowed"}
NAMED_BY = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri", "resources/subscribe": "uri"}


def described(scopes: str) -> str:
    """An operation that needs no more than required_scopes is refused as required_scopes are (README)."""
    return "Insufficient scope" if scopes == " ".join(REQUIRED) else "Insufficient scope for this operation"


def insufficient(scopes: str) -> dict[str, str]:
    return {"error": "insufficient_scope", "error_description": described(scopes), "scope": scopes}


def challenge(scopes: str) -> str:
    return (
        f'Bearer error="insufficient_scope", scope="{scopes}", error_description="{described(scopes)}", '
        f'resource_metadata="{METADATA}"'
    )


def rpc(method: str, name: str | None = None, ident: int | None = 1, **params: Any) -> dict[str, Any]:
    """A JSON-RPC request (a notification with ``ident=None``); ``name`` goes where the method names things."""
    if name is not None:
        params[NAMED_BY[method]] = name
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
    if ident is not None:
        message["id"] = ident
    return message


def encoded(*messages: Any) -> bytes:
    """One message as an object, several as a batch."""
    return json.dumps(messages[0] if len(messages) == 1 else list(messages)).encode()


def guarded(**options: Any) -> Harness:
    settings: dict[str, Any] = {"operation_scopes": RULES, "required_scopes": REQUIRED, "resource": RESOURCE}
    return Harness(FakeProvider(tokens=OPS_TOKENS), read_body=True, **{**settings, **options})


def post(
    harness: Harness, token: str, body: bytes | list[bytes], headers: Headers | None = None, **request: Any
) -> Outcome:
    return harness.request([*bearer(token), *(headers or [])], body=body, **request)


def received(harness: Harness) -> list[tuple[bytes, bool]]:
    """The body messages the app's last request received, as (body, more_body)."""
    return [(m.get("body", b""), m.get("more_body", False)) for m in harness.app_bodies[-1]]


def sent_as(parts: list[bytes]) -> list[tuple[bytes, bool]]:
    return [(part, n < len(parts) - 1) for n, part in enumerate(parts)]


def sentinel(name: str) -> bytes:
    """``Mcp-Name`` as a 2026-07-28 client sends a name that would not survive as a header."""
    return b"=?base64?" + base64.b64encode(name.encode()) + b"?="


def routing(method: str, name: str | bytes | None = None) -> Headers:
    headers = [(b"mcp-method", method.encode())]
    if name is not None:
        headers.append((b"mcp-name", name if isinstance(name, bytes) else name.encode()))
    return headers


# --- the rule table ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "message", "needs"),
    [
        (READER, rpc("tools/call", "read_project"), None),
        (BARE, rpc("tools/call", "read_project"), "mcp projects:read"),
        (READER, rpc("tools/call", "write_project"), "mcp projects:write"),
        (WRITER, rpc("tools/call", "write_project"), None),
        (WRITER, rpc("tools/call", "delete_project"), "mcp projects:delete"),
        (DELETER, rpc("tools/call", "delete_project"), None),
        (DELETER, rpc("tools/call", "delete_admin"), "mcp projects:delete admin"),  # two patterns: the union
        (ADMIN, rpc("tools/call", "delete_admin"), None),
        (BARE, rpc("tools/call", "list_projects"), None),  # no pattern matches: required_scopes only
        (BARE, rpc("tools/call", "DELETE_project"), None),  # names match exactly, as the SDK looks tools up
        (BARE, rpc("tools/list"), None),
        (OUTSIDER, rpc("tools/list"), "mcp"),  # required_scopes join every operation's scopes
        (OUTSIDER, rpc("tools/call", "delete_admin"), "mcp projects:delete admin"),
        (READER, rpc("resources/read", "file:///admin/keys"), "mcp admin"),
        (READER, rpc("resources/read", "file:///admin/a/b/c"), "mcp admin"),  # fnmatch: * spans "/"
        (READER, rpc("resources/subscribe", "file:///admin/keys"), "mcp admin"),
        (READER, rpc("resources/read", "file:///public/readme"), None),
        (ADMIN, rpc("resources/read", "file:///admin/keys"), None),
        (WRITER, rpc("prompts/get", "anything"), "mcp prompts"),  # "METHOD" alone: every name
        (ADMIN, rpc("prompts/get", "anything"), None),
    ],
)
def test_each_operation_needs_the_scopes_of_every_pattern_it_matches(
    token: str, message: dict[str, Any], needs: str | None
) -> None:
    harness = guarded()
    outcome = post(harness, token, encoded(message))
    assert outcome.provider_calls == [token]
    if needs is None:
        assert outcome.status == 200 and received(harness) == [(encoded(message), False)]
        return
    assert outcome.status == 403 and outcome.app_calls == []
    assert outcome.json() == insufficient(needs)
    assert outcome.header("www-authenticate") == challenge(needs)
    assert outcome.header("content-length") == str(len(outcome.body))


def test_one_challenge_names_every_scope_a_batch_needs_required_scopes_first() -> None:
    batch = encoded(rpc("tools/call", "write_x"), rpc("tools/call", "delete_admin", 2), rpc("tools/call", "read_x", 3))
    outcome = post(guarded(), BARE, batch)
    assert outcome.status == 403 and outcome.app_calls == []
    needs = "mcp projects:write projects:delete admin projects:read"
    assert outcome.json() == insufficient(needs) and outcome.header("www-authenticate") == challenge(needs)


def test_the_challenge_has_realm_and_no_metadata_without_resource() -> None:
    harness = Harness(FakeProvider(tokens=OPS_TOKENS), operation_scopes=RULES, realm="ops")
    outcome = post(harness, BARE, encoded(rpc("tools/call", "delete_x")))
    assert outcome.status == 403 and outcome.json() == insufficient("projects:delete")
    expected = 'Bearer realm="ops", error="insufficient_scope", scope="projects:delete", '
    assert outcome.header("www-authenticate") == expected + 'error_description="Insufficient scope for this operation"'


async def async_rule(operation: Operation) -> list[str]:
    return []


class AsyncRule:
    async def __call__(self, operation: Operation) -> list[str]:
        return []


@pytest.mark.parametrize(
    ("rules", "error", "match"),
    [
        ({"tools/call ": ["a"]}, ValueError, "METHOD NAME-PATTERN"),
        ({"": ["a"]}, ValueError, "METHOD NAME-PATTERN"),
        ({" delete_*": ["a"]}, ValueError, "METHOD NAME-PATTERN"),
        ({"tools/call delete_*": "admin"}, TypeError, "list or tuple"),
        ({"tools/call delete_*": ["two words"]}, ValueError, "scope-token"),
        ({"tools/call\ndelete_*": ["a"]}, ValueError, "control characters"),
        ({1: ["a"]}, TypeError, "must be a str"),
        (["tools/call"], TypeError, "mapping of operation pattern"),
        (42, TypeError, "mapping of operation pattern"),
        (async_rule, TypeError, "not an async one"),  # its answer would be a coroutine: every POST a 500
        (AsyncRule(), TypeError, "not an async one"),
    ],
)
def test_rules_that_cannot_mean_what_they_say_are_refused_at_construction(rules: Any, error: type, match: str) -> None:
    with mcp_bearer_log(), pytest.raises(error, match=match):
        BearerAuthMiddleware(Harness().app, FakeProvider(), operation_scopes=rules)


# --- however the request is shaped: nothing runs that the token lacks scopes for ----------------

DELETE = rpc("tools/call", "delete_x")
DELETE_BYTES = encoded(DELETE)
READ_BYTES = encoded(rpc("tools/call", "read_x"))
RESPONSE = {"jsonrpc": "2.0", "id": 9, "result": {}}


def shape(case_id: str, body: bytes | list[bytes], status: int, headers: Headers | None = None, **request: Any) -> Any:
    return pytest.param(body, headers or [], request, status, id=case_id)


def call(members: bytes, head: bytes = b'{"jsonrpc":"2.0","id":1,"method":"tools/call",') -> bytes:
    """A tools/call written by hand, for spellings json.dumps never makes."""
    return head + members + b"}"


H = b'{"jsonrpc":"2.0","id":1,'
DUPLICATE_METHOD = call(b'"method":"tools/call","params":{"name":"delete_x"}', H + b'"method":"tools/list",')
DUPLICATE_NAME = call(b'"params":{"name":"read_x","name":"delete_x"}')
DUPLICATE_PARAMS = call(b'"params":{"name":"delete_x"},"params":{"name":"read_x"}')
ESCAPED = call(b'"par\\u0061ms":{"n\\u0061me":"\\u0064elete_x"}', H + b'"\\u006dethod":"tools\\/call",')
WHITESPACE_BODY = (
    b' \r\n\t{ "jsonrpc" : "2.0" , "id" : 1 ,\n"method"\t:"tools/call","params":{ "name" : "delete_x" } }\n '
)


SHAPES = [
    # MCP 2026-07-28 routing headers must agree with the body the app acts on.
    shape("method-header-says-list", DELETE_BYTES, 400, routing("tools/list")),
    shape("name-header-says-read", DELETE_BYTES, 400, routing("tools/call", "read_x")),
    shape("headers-agree", DELETE_BYTES, 403, routing("tools/call", "delete_x")),
    shape("name-header-absent", DELETE_BYTES, 403, routing("tools/call")),
    shape("name-header-alone", DELETE_BYTES, 403, [(b"mcp-name", b"read_x")]),
    shape("header-names-in-odd-case", DELETE_BYTES, 400, [(b"MCP-Method", b"tools/call"), (b"Mcp-NAME", b"read_x")]),
    shape("sentinel-agrees", DELETE_BYTES, 403, routing("tools/call", sentinel("delete_x"))),
    shape("sentinel-says-read", DELETE_BYTES, 400, routing("tools/call", sentinel("read_x"))),
    shape("sentinel-allowed", READ_BYTES, 200, routing("tools/call", sentinel("read_x"))),
    shape("sentinel-bad-base64", DELETE_BYTES, 400, routing("tools/call", b"=?base64?!!!!?=")),
    shape("sentinel-with-space", DELETE_BYTES, 400, routing("tools/call", b"=?base64?ZGVs ZXRlX3g=?=")),
    shape(
        "sentinel-not-canonical",
        call(b'"params":{"name":"read_xy"}'),
        400,
        routing("tools/call", b"=?base64?cmVhZF94eR==?="),
    ),
    shape("sentinel-not-utf8", DELETE_BYTES, 400, routing("tools/call", b"=?base64?/w==?=")),
    shape("method-header-twice", DELETE_BYTES, 400, routing("tools/call") + routing("tools/call")),
    shape("name-header-twice", DELETE_BYTES, 400, [*routing("tools/call", "delete_x"), (b"mcp-name", b"delete_x")]),
    shape("method-header-on-a-batch", encoded(DELETE, rpc("tools/call", "delete_x", 2)), 400, routing("tools/call")),
    shape("method-header-on-a-response", encoded(RESPONSE), 400, routing("tools/call")),
    # Batches: every element counts, and one the token may not run refuses them all.
    shape("batch-allowed-then-forbidden", encoded(rpc("tools/call", "read_x"), rpc("tools/call", "delete_x", 2)), 403),
    shape("batch-forbidden-then-allowed", encoded(DELETE, rpc("tools/list", ident=2)), 403),
    shape("batch-all-allowed", encoded(rpc("tools/call", "read_x"), rpc("tools/list", ident=2)), 200),
    shape("batch-of-one", b"[" + DELETE_BYTES + b"]", 403),
    shape("batch-response-and-forbidden", encoded(RESPONSE, DELETE), 403),
    shape("batch-responses-only", encoded(RESPONSE, {"jsonrpc": "2.0", "id": 3, "error": {"code": 1}}), 200),
    shape("response-that-also-asks", encoded({**RESPONSE, **DELETE}), 403),
    shape("notification", encoded(rpc("tools/call", "delete_x", None)), 403),
    shape("notification-allowed", encoded(rpc("notifications/initialized", None, None)), 200),
    # One JSON text, many spellings: json.loads reads them all as the SDK does.
    shape("whitespace", WHITESPACE_BODY, 403),
    shape("escaped-name", call(b'"params":{"name":"\\u0064elete_x"}'), 403),
    shape("escaped-keys-and-method", ESCAPED, 403),
    shape("duplicate-method-last-wins", DUPLICATE_METHOD, 403),
    shape("duplicate-name-last-wins", DUPLICATE_NAME, 403),
    shape("duplicate-params-last-wins", DUPLICATE_PARAMS, 200),
    shape("utf8-bom", b"\xef\xbb\xbf" + DELETE_BYTES, 403),
    shape("utf16-le", json.dumps(DELETE).encode("utf-16-le"), 403),
    shape("utf16-be-bom", json.dumps(DELETE).encode("utf-16"), 403),
    shape("utf32", json.dumps(DELETE).encode("utf-32"), 403),
    shape("lone-surrogate-name", call(b'"params":{"name":"delete_\\ud800"}'), 403),
    shape("nan-id", call(b'"params":{"name":"delete_x"}', b'{"jsonrpc":"2.0","id":NaN,"method":"tools/call",'), 403),
    shape(
        "infinite-id", call(b'"params":{"name":"delete_x"}', b'{"jsonrpc":"2.0","id":1e999,"method":"tools/call",'), 403
    ),
    # Chunked, split anywhere: inside a key, an escape, a UTF-8 sequence.
    shape("split-in-key", [H + b'"met', b'hod":"tools/call","params":{"name":"delete_x"}}'], 403),
    shape("split-in-escape", [call(b'"params":{"name":"\\u00')[:-1], b'64elete_x"}}'], 403),
    shape("split-in-utf16", [json.dumps(DELETE).encode("utf-16")[:7], json.dumps(DELETE).encode("utf-16")[7:]], 403),
    shape("byte-by-byte", [bytes([b]) for b in DELETE_BYTES], 403),
    shape("empty-parts-around", [b"", DELETE_BYTES, b""], 403),
    # Wherever it is posted, with whatever content type: the body is what the app reads.
    shape("text-plain", DELETE_BYTES, 403, [(b"content-type", b"text/plain")]),
    shape("form-encoded", DELETE_BYTES, 403, [(b"content-type", b"application/x-www-form-urlencoded")]),
    shape("path-trailing-slash", DELETE_BYTES, 403, path="/mcp/"),
    shape("path-double-slash", DELETE_BYTES, 403, path="//mcp"),
    shape("path-upper-case", DELETE_BYTES, 403, path="/MCP"),
    shape("path-sse-messages", DELETE_BYTES, 403, path="/messages/", query_string=b"session_id=abc"),
    shape("path-under-root", DELETE_BYTES, 403, path="/api/mcp", root_path="/api"),
    shape("path-excluded-look-alike", DELETE_BYTES, 403, path="/health/"),
    # Bodies nobody can read with certainty are refused, never guessed at (400, never 500).
    shape("not-json", b"delete_x please", 400),
    shape("empty-body", b"", 400),
    shape("trailing-data", DELETE_BYTES + b" {}", 400),
    shape("two-documents", DELETE_BYTES + READ_BYTES, 400),
    shape("invalid-utf8", DELETE_BYTES[:-3] + b"\xff}}", 400),
    shape("empty-batch", b"[]", 400),
    shape("nested-batch", b"[[" + DELETE_BYTES + b"]]", 400),
    shape("number-element", b"[1, " + DELETE_BYTES + b"]", 400),
    shape("string-document", b'"tools/call"', 400),
    shape("null-document", b"null", 400),
    shape("params-missing", encoded({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}), 400),
    shape("params-null", encoded({**DELETE, "params": None}), 400),
    shape("params-a-list", encoded({**DELETE, "params": ["delete_x"]}), 400),
    shape("params-null-elsewhere", encoded({**rpc("tools/list"), "params": None}), 400),
    shape("name-a-number", encoded(rpc("tools/call", 7)), 400),  # type: ignore[arg-type]
    shape("name-null", encoded({**DELETE, "params": {"name": None}}), 400),
    shape("name-a-list", encoded({**DELETE, "params": {"name": ["delete_x"]}}), 400),
    shape("uri-an-object", encoded({**rpc("resources/read"), "params": {"uri": {"path": "/admin"}}}), 400),
    shape("method-a-number", encoded({**DELETE, "method": 1}), 400),
    shape("method-missing", encoded({"jsonrpc": "2.0", "id": 1, "params": {"name": "delete_x"}}), 400),
    shape(
        "huge-int-id", call(b'"params":{"name":"read_x"}', b'{"id":' + b"9" * 5000 + b',"method":"tools/call",'), 400
    ),
    shape("deep-document", b"[" * 100_000 + b"]" * 100_000, 400),
    shape(
        "deep-arguments", call(b'"params":{"name":"read_x","arguments":' + b"[" * 50_000 + b"]" * 50_000 + b"}"), 400
    ),
    shape("params-allowed-missing", encoded({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}), 200),
]


@pytest.mark.parametrize(("body", "headers", "request_options", "status"), SHAPES)
def test_no_operation_runs_for_a_token_without_its_scopes_however_the_request_is_shaped(
    body: bytes | list[bytes], headers: Headers, request_options: dict[str, Any], status: int
) -> None:
    harness = guarded()
    outcome = post(harness, READER, body, headers, **request_options)
    assert outcome.status == status, outcome.body
    if status == 200:
        parts = body if isinstance(body, list) else [body]
        assert received(harness) == sent_as(parts)  # byte for byte, in the same messages
        return
    assert outcome.app_calls == []
    if status == 400:
        assert outcome.json() == UNREADABLE and outcome.header("www-authenticate") is None
    else:
        assert outcome.json()["error"] == "insufficient_scope" and "projects:delete" in outcome.json()["scope"].split()


@pytest.mark.parametrize(
    "body",
    [DUPLICATE_METHOD, DUPLICATE_NAME, DUPLICATE_PARAMS, ESCAPED, WHITESPACE_BODY],
)
def test_the_sdk_parsers_read_these_bodies_as_the_guard_judged_them(body: bytes) -> None:
    """An oracle from the SDK itself: its pydantic parser (the SSE path) and json.loads (streamable HTTP)."""
    parsed: Any
    if MCP_MAJOR == 2:
        from mcp_types import jsonrpc_message_adapter

        parsed = jsonrpc_message_adapter.validate_json(body, by_name=False)
    else:
        parsed = importlib.import_module("mcp.types").JSONRPCMessage.model_validate_json(body).root
    loaded = json.loads(body)
    judged = post(guarded(), READER, body).status
    assert (parsed.method, (parsed.params or {}).get("name")) == (loaded["method"], loaded["params"]["name"])
    assert judged == (403 if loaded["params"]["name"] == "delete_x" else 200)


# --- a property: for any generated JSON-RPC body, the app runs only if every operation is allowed --

PROPERTY_NAMES = ["read_a", "delete_a", "write_a", "delete_admin", "other", "file:///admin/x", "file:///pub/x"]
PROPERTY_METHODS = ["tools/call", "prompts/get", "resources/read", "tools/list", "ping", "notifications/initialized"]
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]
WHITESPACE = st.text(alphabet=" \t\r\n", max_size=2)


class Pairs(list[tuple[str, Any]]):
    """A JSON object as written: its keys in order, duplicates allowed (json.loads keeps the last)."""


@st.composite
def json_text(draw: st.DrawFn, value: Any) -> str:
    """``value`` written with random whitespace and random escapes, as any JSON writer may."""
    ws = draw(WHITESPACE)
    if isinstance(value, Pairs):
        members = [f"{draw(json_text(key))}{draw(WHITESPACE)}:{draw(json_text(item))}" for key, item in value]
        return "{" + ws + ("," + draw(WHITESPACE)).join(members) + draw(WHITESPACE) + "}"
    if isinstance(value, list):
        return "[" + ws + ",".join(draw(json_text(item)) for item in value) + "]"
    if isinstance(value, str):
        escape = draw(st.lists(st.booleans(), min_size=len(value), max_size=len(value)))
        chars = [f"\\u{ord(c):04x}" if e else json.dumps(c)[1:-1] for c, e in zip(value, escape, strict=True)]
        return '"' + "".join(chars) + '"'
    return ws + json.dumps(value) + ws


@st.composite
def jsonrpc_element(draw: st.DrawFn, ident: int) -> Pairs:
    kind = draw(st.sampled_from(["request", "request", "notification", "response"]))
    if kind == "response":
        return Pairs([("jsonrpc", "2.0"), ("id", ident), ("result", Pairs())])
    method = draw(st.sampled_from(PROPERTY_METHODS))
    params = Pairs()
    if method in NAMED_BY:
        params.append((NAMED_BY[method], draw(st.sampled_from(PROPERTY_NAMES))))
        if draw(st.booleans()):  # a decoy the SDK will not read: an earlier duplicate
            params.insert(0, (NAMED_BY[method], draw(st.sampled_from(PROPERTY_NAMES))))
    members = Pairs([("jsonrpc", "2.0"), ("method", method), ("params", params)])
    if draw(st.booleans()):
        members.insert(1, ("method", draw(st.sampled_from(PROPERTY_METHODS))))
    if kind == "request":
        members.append(("id", ident))
    return members


@st.composite
def jsonrpc_request(draw: st.DrawFn) -> tuple[list[bytes], Headers, str]:
    count = draw(st.integers(1, 4))
    elements = [draw(jsonrpc_element(n)) for n in range(count)]
    document: Any = elements if count > 1 or draw(st.booleans()) else elements[0]
    body = draw(json_text(document)).encode(draw(st.sampled_from(ENCODINGS)))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    headers: Headers = []
    if draw(st.booleans()):
        headers.append((b"mcp-method", draw(st.sampled_from(PROPERTY_METHODS)).encode()))
        if draw(st.booleans()):
            name = draw(st.sampled_from(PROPERTY_NAMES))
            headers.append((b"mcp-name", sentinel(name) if draw(st.booleans()) else name.encode()))
    return parts, headers, draw(st.sampled_from(list(SCOPES)))


def expected_status(body: bytes, headers: Headers, token: str) -> int:
    """The oracle: json.loads (the SDK's reading) and fnmatch over RULES, written from the rules alone."""
    document = json.loads(body)
    elements = document if isinstance(document, list) else [document]
    operations = [(e["method"], e["params"].get(NAMED_BY.get(e["method"], ""))) for e in elements if "method" in e]
    found = dict(headers)
    if b"mcp-method" in found:
        agrees = len(elements) == 1 and len(operations) == 1 and operations[0][0] == found[b"mcp-method"].decode()
        label = found.get(b"mcp-name", b"").decode()
        name = base64.b64decode(label[9:-2]).decode() if label.startswith("=?base64?") else label
        if not agrees or (b"mcp-name" in found and operations[0][0] in NAMED_BY and operations[0][1] != name):
            return 400
    needed = set(REQUIRED)
    for method, name in operations:
        for pattern, scopes in RULES.items():
            rule_method, _, rule_name = pattern.partition(" ")
            if rule_method == method and (not rule_name or fnmatch.fnmatchcase(name, rule_name)):
                needed.update(scopes)
    return 200 if needed <= set(SCOPES[token]) else 403


PROPERTY_HARNESS = guarded()


@pytest.mark.slow  # about 30 s for the profile's 2,000 bodies: CI's run, not the quick loop
@given(jsonrpc_request())
def test_fuzz_the_app_runs_only_when_every_operation_is_allowed_and_gets_the_body_as_sent(
    case: tuple[list[bytes], Headers, str],
) -> None:
    parts, headers, token = case
    harness = PROPERTY_HARNESS
    calls_before = len(harness.app_calls)
    outcome = post(harness, token, parts, headers)
    expected = expected_status(b"".join(parts), headers, token)
    assert outcome.status == expected, (b"".join(parts), headers, token, outcome.body)
    if expected == 200:
        assert received(harness) == sent_as(parts)
    else:
        assert len(harness.app_calls) == calls_before


# --- reading the body: bounded, replayed, and only when it must be --------------------------------


def run(middleware: Any, scope: Scope, receive: Receive) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    anyio.run(middleware, scope, receive, send)
    return sent


def http_scope(headers: Headers, method: str = "POST") -> Scope:
    return {"type": "http", "method": method, "path": "/mcp", "root_path": "", "headers": headers, "query_string": b""}


def test_a_body_over_max_body_size_is_413_whether_in_one_message_or_streamed() -> None:
    harness = guarded(max_body_size=128)
    exactly = encoded(rpc("tools/call", "read_" + "x" * (128 - len(encoded(rpc("tools/call", "read_"))))))
    assert len(exactly) == 128 and post(harness, READER, exactly).status == 200
    for body in ([exactly + b" "], [exactly[:40], exactly[40:], b" "], [b" " * 60] * 3):
        outcome = post(harness, READER, body)
        assert outcome.status == 413 and outcome.json() == TOO_LARGE and outcome.app_calls == []
        assert outcome.header("www-authenticate") is None


def test_a_client_that_disconnects_mid_body_gets_400_and_the_app_never_runs() -> None:
    harness = guarded()
    # Even what was read so far is a whole JSON-RPC message the token may send: nobody waits for its answer.
    messages: list[Message] = [
        {"type": "http.request", "body": READ_BYTES, "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        return messages.pop(0)

    sent = run(harness.middleware, http_scope(bearer(ADMIN)), receive)
    assert sent[0]["status"] == 400 and json.loads(sent[1]["body"]) == UNREADABLE
    assert harness.app_calls == []


@pytest.mark.parametrize(
    ("options", "method", "token"),
    [
        ({}, "POST", READER),  # no operation_scopes: nothing to read the body for
        ({"operation_scopes": RULES}, "GET", READER),  # non-POST: required_scopes only
        ({"operation_scopes": RULES}, "DELETE", READER),
    ],
)
def test_the_body_is_left_unread_unless_an_operation_must_be_judged(
    options: dict[str, Any], method: str, token: str
) -> None:
    harness = Harness(FakeProvider(tokens=OPS_TOKENS), required_scopes=REQUIRED, **options)
    sent = run(harness.middleware, http_scope(bearer(token), method), never_receive)
    assert sent[0]["status"] == 200 and len(harness.app_calls) == 1


@pytest.mark.parametrize("headers", [[], bearer("sk-nobody"), [*bearer(READER), (b"origin", b"https://x")]])
def test_a_request_refused_before_its_operation_is_judged_never_has_its_body_read(headers: Headers) -> None:
    harness = guarded(allowed_origins=["https://app.example.com"])
    sent = run(harness.middleware, http_scope(headers), never_receive)
    assert sent[0]["status"] in (401, 403) and harness.app_calls == []


@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT", "post"])
def test_requests_other_than_post_need_only_required_scopes_and_the_app_gets_their_body(method: str) -> None:
    """The SDK acts only on POST bodies (checked end to end below); others pass with required_scopes."""
    harness = guarded()
    outcome = post(harness, READER, [DELETE_BYTES[:5], DELETE_BYTES[5:]], method=method)
    assert outcome.status == 200 and received(harness) == sent_as([DELETE_BYTES[:5], DELETE_BYTES[5:]])
    refused = post(harness, OUTSIDER, DELETE_BYTES, method=method)
    assert refused.status == 403 and refused.json()["scope"] == "mcp" and refused.app_calls == []


def test_websockets_need_only_required_scopes() -> None:
    harness = guarded()
    assert harness.request(bearer(READER), scope_type="websocket").messages == [{"type": "websocket.accept"}]
    refused = harness.request(bearer(OUTSIDER), scope_type="websocket", extensions={"websocket.http.response": {}})
    assert refused.status == 403 and refused.app_calls == []


# --- a callable rule ------------------------------------------------------------------------------


def test_a_callable_rule_gets_each_operation_with_its_params_and_its_answer_is_enforced() -> None:
    seen: list[Operation] = []

    def decide(operation: Operation) -> list[str]:
        seen.append(operation)
        return ["danger"] if operation.params.get("arguments", {}).get("force") else []

    harness = guarded(operation_scopes=decide)
    safe = rpc("tools/call", "delete_x", arguments={"force": False})
    assert post(harness, READER, encoded(safe, rpc("tools/list", ident=2))).status == 200
    assert seen == [Operation("tools/call", "delete_x", safe["params"]), Operation("tools/list", None, {})]
    forced = post(harness, READER, encoded(rpc("resources/read", "file:///x", arguments={"force": True})))
    assert forced.status == 403 and forced.json() == insufficient("mcp danger") and forced.app_calls == []
    assert seen[-1] == Operation("resources/read", "file:///x", {"uri": "file:///x", "arguments": {"force": True}})


def raising_rule(operation: Operation) -> list[str]:
    raise RuntimeError("rule crashed")


@pytest.mark.parametrize(
    "rule",
    [raising_rule, lambda op: None, lambda op: "admin", lambda op: 42, lambda op: ["two words"], lambda op: [1]],
    ids=["raises", "none", "a-str", "a-number", "not-scope-tokens", "not-strings"],
)
def test_a_callable_rule_that_fails_is_500_logged_and_the_app_never_runs(rule: Callable[[Operation], Any]) -> None:
    harness = guarded(operation_scopes=rule)
    with mcp_bearer_log() as records:
        outcome = post(harness, ADMIN, DELETE_BYTES)
    assert outcome.status == 500 and outcome.json() == SERVER_ERROR and outcome.app_calls == []
    (record,) = records
    assert record.levelno == logging.ERROR and record.getMessage().startswith("operation_scopes failed")
    assert "Traceback" in record.getMessage()


# --- scope hierarchies: scope_implies ---------------------------------------------------------------

HIERARCHY = {"admin": ["write"], "write": ["read"], "projects:admin": ["projects:delete", "projects:write"]}


def granting(*scopes: str) -> FakeProvider:
    return FakeProvider(otherwise=AccessToken("", {"sub": "h"}, list(scopes)))


@pytest.mark.parametrize(
    ("granted", "required", "passes"),
    [
        (["admin"], ["read"], True),  # admin -> write -> read
        (["admin"], ["write", "read", "admin"], True),
        (["write"], ["read"], True),
        (["write"], ["admin"], False),  # implication runs one way
        (["read"], ["write"], False),
        (["projects:admin"], ["projects:delete"], True),
        ([], ["read"], False),
    ],
)
def test_required_scopes_follow_the_hierarchy_transitively(
    granted: list[str], required: list[str], passes: bool
) -> None:
    harness = Harness(granting(*granted), required_scopes=required, scope_implies=HIERARCHY)
    outcome = harness.request(bearer("sk-any"))
    assert outcome.status == (200 if passes else 403)
    if passes:
        ((_, access),) = outcome.app_calls
        assert access is not None and access.scopes == granted  # what was granted, not what it implies


def test_without_scope_implies_a_broad_scope_implies_nothing() -> None:
    assert Harness(granting("admin"), required_scopes=["read"]).request(bearer("sk-any")).status == 403


def test_a_cycle_in_the_hierarchy_is_harmless() -> None:
    cycle = {"a": ["b"], "b": ["c"], "c": ["a"]}
    for required in (["a"], ["b"], ["c"]):
        assert (
            Harness(granting("b"), required_scopes=required, scope_implies=cycle).request(bearer("sk-x")).status == 200
        )
    assert Harness(granting("b"), required_scopes=["d"], scope_implies=cycle).request(bearer("sk-x")).status == 403


def test_operation_scopes_follow_the_hierarchy_and_the_challenge_names_what_the_operation_needs() -> None:
    harness = Harness(granting("projects:admin"), operation_scopes=RULES, scope_implies=HIERARCHY)
    assert harness.request(bearer("sk-x"), body=encoded(rpc("tools/call", "delete_x"))).status == 200
    refused = harness.request(bearer("sk-x"), body=encoded(rpc("tools/call", "read_x")))
    assert refused.status == 403 and refused.json()["scope"] == "projects:read"


@pytest.mark.parametrize("granted", ["read write", None, [["read"]], [{"read": True}], [None, "mcp"]])
@pytest.mark.parametrize(
    "options",
    [
        {"required_scopes": ["read"]},
        {"required_scopes": ["read"], "scope_implies": HIERARCHY},
        {"operation_scopes": {"tools/list": ["read"]}},
        {"operation_scopes": {"tools/list": ["read"]}, "scope_implies": HIERARCHY},
    ],
    ids=["required", "required-hierarchy", "operation", "operation-hierarchy"],
)
def test_a_grant_that_is_not_a_list_of_scope_strings_amounts_to_none(granted: Any, options: dict[str, Any]) -> None:
    """A provider's junk (a str, a list in the list) is refused with 403 like any missing scope, never a crash."""
    provider = FakeProvider(otherwise=AccessToken("", {"sub": "h"}, granted))
    outcome = Harness(provider, **options).request(bearer("sk-x"), body=encoded(rpc("tools/list")))
    assert outcome.status == 403 and outcome.app_calls == []


def test_require_scopes_in_the_app_follows_the_hierarchy() -> None:
    answers: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for needed in ("read", "admin"):
            try:
                answers.append(require_scopes(needed).scopes)
            except InsufficientScopeError as exc:
                answers.append(list(exc.missing_scopes))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = BearerAuthMiddleware(app, granting("write"), scope_implies=HIERARCHY)
    assert run(middleware, http_scope(bearer("sk-x"), "GET"), never_receive)[0]["status"] == 200
    assert answers == [["write"], ["admin"]]


@pytest.mark.parametrize(
    ("implies", "error"),
    [
        (["admin"], TypeError),
        ({"admin": "write"}, TypeError),
        ({"admin write": ["read"]}, ValueError),
        ({"a": ["b c"]}, ValueError),
    ],
)
def test_a_hierarchy_that_cannot_be_read_is_refused_at_construction(implies: Any, error: type) -> None:
    with mcp_bearer_log(), pytest.raises(error):
        BearerAuthMiddleware(Harness().app, FakeProvider(), scope_implies=implies)


# --- Origin: MCP transports, "If the Origin header is present and invalid, servers MUST respond 403" --

ORIGINS = ["https://app.example.com", "http://localhost:3000"]


@pytest.mark.parametrize(
    ("origins", "passes"),
    [
        ([], True),  # no Origin: a client that is not a browser
        ([b"https://app.example.com"], True),
        ([b"HTTPS://APP.EXAMPLE.COM"], True),  # scheme and host are case-insensitive
        ([b"http://localhost:3000"], True),
        ([b"https://evil.example"], False),
        ([b"null"], False),  # sandboxed frames, file: pages
        ([b"https://app.example.com.evil.example"], False),
        ([b"https://app.example.com:443"], False),
        ([b"http://app.example.com"], False),
        ([b"http://localhost:3001"], False),
        ([b""], False),
        ([b"https://app.example.com", b"https://evil.example"], False),  # every Origin present must be listed
        ([b"https://evil.example", b"https://app.example.com"], False),
    ],
)
def test_a_present_origin_must_be_listed_before_any_token_is_looked_at(origins: list[bytes], passes: bool) -> None:
    harness = guarded(allowed_origins=ORIGINS)
    headers = [*bearer(ADMIN), *((b"Origin" if n else b"origin", o) for n, o in enumerate(origins))]
    outcome = harness.request(headers, body=READ_BYTES)
    if passes:
        assert outcome.status == 200 and outcome.provider_calls == [ADMIN]
        return
    assert outcome.status == 403 and outcome.json() == BAD_ORIGIN and outcome.header("www-authenticate") is None
    assert outcome.provider_calls == [] and outcome.app_calls == []


@pytest.mark.parametrize(
    ("path", "method", "headers"),
    [
        ("/mcp", "OPTIONS", PREFLIGHT),  # a preflight from an unlisted origin is refused, not answered
        ("/health", "GET", [(b"origin", b"https://evil.example")]),  # excluded paths too
        ("/.well-known/oauth-protected-resource/mcp", "GET", [(b"origin", b"https://evil.example")]),
    ],
)
def test_an_unlisted_origin_is_refused_on_public_paths_and_preflights_too(
    path: str, method: str, headers: Headers
) -> None:
    harness = guarded(allowed_origins=ORIGINS, exclude_paths=["/health"])
    outcome = harness.request(headers, path=path, method=method)
    assert outcome.status == 403 and outcome.json() == BAD_ORIGIN and outcome.app_calls == []


def test_a_preflight_from_a_listed_origin_is_answered_here_and_the_app_never_sees_it() -> None:
    harness = guarded(allowed_origins=ORIGINS)
    listed = [(b"origin", b"https://app.example.com"), (b"access-control-request-method", b"POST")]
    outcome = harness.request(listed, method="OPTIONS")
    assert outcome.status == 204 and outcome.app_calls == [] and outcome.provider_calls == []


def test_a_websocket_from_an_unlisted_origin_is_refused() -> None:
    harness = guarded(allowed_origins=ORIGINS)
    evil = [*bearer(ADMIN), (b"origin", b"https://evil.example")]
    refused = harness.request(evil, scope_type="websocket", extensions={"websocket.http.response": {}})
    assert refused.status == 403 and refused.provider_calls == [] and refused.app_calls == []
    closed = harness.request(evil, scope_type="websocket")
    assert closed.messages == [{"type": "websocket.close", "code": 1008}] and closed.app_calls == []
    listed = [*bearer(ADMIN), (b"origin", b"https://app.example.com")]
    assert harness.request(listed, scope_type="websocket").messages == [{"type": "websocket.accept"}]


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com/",
        "https://app.example.com/path",
        "https://app.example.com?",
        "https://app.example.com#",
        "https://user@app.example.com",
        "https://*.example.com",
        "https://*",
        "*",
        "null",
        "app.example.com",
        "ftp://app.example.com",
        "https://",
        "https://app.example.com:https",
        "https://app example.com",
        "https://app.example.com:443",  # browsers never send a default port: this would match nothing
        "http://localhost:80",
        "https://app.example.com:0",
        "https://app.example.com:99999",
    ],
)
def test_an_entry_that_is_no_origin_a_browser_sends_is_refused_at_construction(origin: str) -> None:
    with mcp_bearer_log(), pytest.raises(ValueError, match="allowed_origins"):
        BearerAuthMiddleware(Harness().app, FakeProvider(), allowed_origins=[origin])


def test_allowed_origins_must_be_a_list() -> None:
    with mcp_bearer_log(), pytest.raises(TypeError, match="allowed_origins"):
        BearerAuthMiddleware(Harness().app, FakeProvider(), allowed_origins="https://app.example.com")


# --- the SDK's own apps under uvicorn: a tool the token lacks scopes for never runs --------------

RAN: collections.Counter[str] = collections.Counter()
AREAS: list[str] = []  # the area every read of the resource template was served for


def read_project() -> str:
    RAN["read_project"] += 1
    return "read"


def delete_project() -> str:
    RAN["delete_project"] += 1
    return "deleted"


def publish() -> dict[str, Any]:
    """Needs projects:write, which projects:admin implies; answers with what the token was granted."""
    try:
        access = require_scopes("projects:write")
    except InsufficientScopeError as exc:
        return {"missing": list(exc.missing_scopes)}
    return {"granted": access.scopes}


@pytest.fixture(autouse=True)
def counted() -> Iterator[None]:
    RAN.clear()
    AREAS.clear()
    yield


def guarded_app(app: Any, **options: Any) -> BearerAuthMiddleware:
    settings: dict[str, Any] = {"operation_scopes": RULES, "required_scopes": REQUIRED, "resource": RESOURCE}
    return BearerAuthMiddleware(app, FakeProvider(tokens=OPS_TOKENS), **{**settings, **options})


def tools_call(name: str, ident: int = 50) -> bytes:
    return encoded(rpc("tools/call", name, ident, arguments={}))


def post_raw(
    base: str, token: str, body: bytes, session_id: str | None = None, path: str = "/mcp", method: str = "POST"
) -> tuple[int, dict[str, str], bytes]:
    headers = {**MCP_POST_HEADERS, "Authorization": f"Bearer {token}", "mcp-protocol-version": "2025-11-25"}
    if method == "GET":
        headers["accept"] = "application/json"  # an event stream would stay open
    if session_id is not None:
        headers["mcp-session-id"] = session_id
    return raw_request(base, method, path, headers, body)


@contextlib.asynccontextmanager
async def noting_session(url: str, token: str) -> AsyncIterator[tuple[Any, list[str]]]:
    """An SDK session (the 2025-11-25 handshake) and the session ids its responses carried."""
    ids: list[str] = []

    async def note(response: httpx.Response) -> None:
        if "mcp-session-id" in response.headers:
            ids.append(response.headers["mcp-session-id"])

    async with mcp_session(url, token, event_hooks={"response": [note]}) as (session, _):
        yield session, ids


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("stateless", "json_response", "root_path"),
    [(False, False, ""), (False, True, ""), (True, False, ""), (True, True, ""), (False, False, "/api")],
    ids=["stateful-sse", "stateful-json", "stateless-sse", "stateless-json", "stateful-under-root-path"],
)
async def test_e2e_a_tool_call_the_token_lacks_scopes_for_is_403_and_the_tool_never_runs(
    stateless: bool, json_response: bool, root_path: str
) -> None:
    app = guarded_app(mcp_app(read_project, delete_project, stateless=stateless, json_response=json_response))
    with serve(app, root_path=root_path) as base:
        async with noting_session(base + "/mcp", READER) as (session, ids):
            assert tool_text(await session.call_tool("read_project", {})) == "read"
            status, headers, body = post_raw(base, READER, tools_call("delete_project"), ids[0] if ids else None)
            assert (status, json.loads(body)) == (403, insufficient("mcp projects:delete"))
            assert headers["www-authenticate"] == challenge("mcp projects:delete")
            assert tool_text(await session.call_tool("read_project", {})) == "read"  # the session carries on
        assert RAN == {"read_project": 2}
        async with mcp_session(base + "/mcp", DELETER) as (session, _):
            assert tool_text(await session.call_tool("delete_project", {})) == "deleted"
    assert RAN == {"read_project": 2, "delete_project": 1}


@pytest.mark.slow
@pytest.mark.anyio
async def test_e2e_the_legacy_sse_messages_path_is_judged_too() -> None:
    from mcp.client.session import ClientSession
    from mcp.client.sse import sse_client

    server = Server("test")
    for tool in (read_project, delete_project):
        server.tool()(tool)
    with serve(guarded_app(server.sse_app())) as base:
        ids: list[str] = []
        headers = {"Authorization": f"Bearer {READER}"}
        async with (
            sse_client(base + "/sse", headers=headers, on_session_created=ids.append) as streams,
            ClientSession(streams[0], streams[1]) as session,
        ):
            await session.initialize()
            assert tool_text(await session.call_tool("read_project", {})) == "read"
            path = f"/messages/?session_id={ids[0]}"
            status, _, body = post_raw(base, READER, tools_call("delete_project"), path=path)
            assert (status, json.loads(body)) == (403, insufficient("mcp projects:delete"))
            assert tool_text(await session.call_tool("read_project", {})) == "read"
    assert RAN == {"read_project": 2}


@pytest.mark.slow
@pytest.mark.anyio
async def test_e2e_the_sdk_acts_on_post_bodies_only_so_a_tool_call_sent_otherwise_never_runs() -> None:
    with serve(guarded_app(mcp_app(read_project, delete_project))) as base:
        async with noting_session(base + "/mcp", READER) as (_, ids):
            for method in ("GET", "PUT", "PATCH", "post", "DELETE"):  # DELETE last: it may end the session
                status, _, _ = post_raw(base, READER, tools_call("delete_project"), ids[0], method=method)
                assert status < 500, method
            assert RAN["delete_project"] == 0


def secret() -> str:
    RAN["secret"] += 1
    return "top secret"


def area_doc(area: str, name: str) -> str:
    AREAS.append(area)
    return f"{area}/{name}"


URI_SPELLINGS = [
    "file:///admin/secret",
    "FILE:///admin/secret",  # mcp 1.x reads uri as a pydantic AnyUrl, which normalizes all these
    "File:///admin/secret",
    "file:///public/../admin/secret",
    "file:///admin/./secret",
    "file://localhost/admin/secret",
    "file:/admin/secret",
    " file:///admin/secret",
    "file:\\\\\\admin\\secret",
    "file:///%61dmin/secret",  # RFC 3986 6.2.2.2: the same URI; mcp 2.x templates decode what they extract
    "file:///%41dmin/secret",
    "file:///admin%2Fsecret/x",
]


@pytest.mark.slow
@pytest.mark.anyio
async def test_e2e_no_spelling_of_a_protected_resource_uri_is_served_to_a_token_without_its_scopes() -> None:
    server = Server("test")
    server.resource("file:///admin/secret")(secret)
    server.resource("file:///{area}/{name}")(area_doc)
    if MCP_MAJOR == 2:
        app = server.streamable_http_app(stateless_http=True, json_response=True)
    else:
        settings: Any = server.settings  # mcp 1.x: the transport's options are the server's settings
        settings.stateless_http = settings.json_response = True
        app = server.streamable_http_app()
    with serve(guarded_app(app)) as base:
        for uri in URI_SPELLINGS:
            status, _, body = post_raw(base, READER, encoded(rpc("resources/read", uri)))
            assert status in (200, 403) and b"top secret" not in body, (uri, status, body)
        assert RAN["secret"] == 0 and "admin" not in AREAS, (RAN, AREAS)
        status, _, body = post_raw(base, ADMIN, encoded(rpc("resources/read", "file:///admin/secret")))
        assert status == 200 and b"top secret" in body


PUBLISHER_1 = "sk-ops-publisher-1-8Kd3Lf6Gh1Js4"
PUBLISHER_2 = "sk-ops-publisher-2-5Pw9Qe2Rt7Yu3"  # the same user after a key rotation, now with more scopes
PUBLISHERS = {
    PUBLISHER_1: {"sub": "pat", "scopes": ["mcp"]},
    PUBLISHER_2: {"sub": "pat", "scopes": ["mcp", "projects:admin"]},
}
SECRETS.update(PUBLISHERS)


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("stateless", [False, True], ids=["stateful", "stateless"])
async def test_e2e_require_scopes_in_a_tool_follows_the_hierarchy_with_the_current_requests_grant(
    stateless: bool,
) -> None:
    """mcp 1.x runs a stateful session's tools in its first request's context; the grant and the
    hierarchy must still be the current request's (from the SDK's request context, scope state)."""
    provider = FakeProvider(tokens=PUBLISHERS)
    app = BearerAuthMiddleware(mcp_app(publish, stateless=stateless), provider, scope_implies=HIERARCHY)
    with serve(app) as base:
        async with mcp_session(base + "/mcp", PUBLISHER_1) as (session, client):
            assert await call_json(session, "publish") == {"missing": ["projects:write"]}
            client.headers["Authorization"] = f"Bearer {PUBLISHER_2}"
            assert await call_json(session, "publish") == {"granted": ["mcp", "projects:admin"]}
            client.headers["Authorization"] = f"Bearer {PUBLISHER_1}"
            assert await call_json(session, "publish") == {"missing": ["projects:write"]}


@pytest.mark.slow
def test_e2e_413_for_a_body_over_max_body_size_declared_or_chunked() -> None:
    with serve(guarded_app(mcp_app(read_project), max_body_size=1024)) as base:
        big = encoded(rpc("tools/call", "read_project", arguments={"pad": "x" * 2048}))
        status, _, body = post_raw(base, READER, big)
        assert (status, json.loads(body)) == (413, TOO_LARGE)
        host, port = base.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=20)
        try:
            headers = {**MCP_POST_HEADERS, "Authorization": f"Bearer {READER}", "Transfer-Encoding": "chunked"}
            connection.request(
                "POST", "/mcp", body=iter([big[:1000], big[1000:]]), headers=headers, encode_chunked=True
            )
            response = connection.getresponse()
            assert (response.status, json.loads(response.read())) == (413, TOO_LARGE)
        finally:
            connection.close()
    assert RAN == {}
