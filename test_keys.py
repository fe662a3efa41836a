"""API keys of our own and the keys file that holds them.

Keys are ``mcpb_<id>_<secret><checksum>``: a typo or a foreign token shaped like ours fails the checksum
and is refused before any lookup. The keys file holds digests only, with expiry; ``mcp-bearer keys``
makes, lists and revokes keys, writing the file whole (temp file, rename, mode 0600). A server follows
the file as it changes, off the event loop, at most once a second, and keeps its last good set when an
edit is broken. Nothing shows a key after it was printed once, nor its digest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import mcp_bearer
from mcp_bearer import KEY_PREFIX, AccessToken, BearerAuthMiddleware, StaticTokenProvider, new_api_key
from support import (
    BOB,
    INVALID_TOKEN,
    SECRETS,
    FakeProvider,
    Harness,
    bearer,
    call_json,
    fingerprint,
    httpx,
    mcp_app,
    mcp_bearer_log,
    serve,
    verdict,
    whoami,
)
from test_cli_operator import (
    CONSOLE_SCRIPT,
    ENTRY_POINTS,
    PYTHON_M,
    one_error_line,
    post_initialize,
    run,
    served,
    user_module,
    whoami_on_both_generations,
)

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_SHAPE = re.compile(r"mcpb_([0-9a-f]{12})_[0-9A-Za-z]{38}")
# "Within 2 s" is the promise (a check at most once a second, then the read); the bound leaves room
# for a loaded two-core VM.
WATCH_BOUND = 6.0


def register(key: str) -> str:
    """A key and every spelling of its digest are secrets: no log, listing or banner may show one."""
    digest = hashlib.sha256(key.encode()).digest()
    SECRETS.update({key, digest.hex(), base64.b64encode(digest).decode()})
    SECRETS.add(base64.urlsafe_b64encode(digest).decode().rstrip("="))
    return key


def fresh_key() -> str:
    return register(new_api_key()[0])


def record(key: str, sub: str = "alice", **fields: Any) -> dict[str, Any]:
    """A keys file record, as ``mcp-bearer keys new`` writes it."""
    base: dict[str, Any] = {
        "id": mcp_bearer._key_id(key) or None,
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "claims": {"sub": sub},
        "scopes": [],
        "created_at": int(time.time()),
        "expires_at": None,
    }
    return {**base, **fields}


def write(path: Path, content: str | bytes | dict[str, Any], *, in_place: bool = False) -> None:
    """Replace the file as a careful tool does (temp file, rename), or ``in_place`` as an editor may."""
    data = content if isinstance(content, bytes) else (content if isinstance(content, str) else json.dumps(content))
    raw = data.encode() if isinstance(data, str) else data
    if in_place:
        path.write_bytes(raw)
        return
    temporary = path.with_name(path.name + ".new")
    temporary.write_bytes(raw)
    os.replace(temporary, path)


def keys_of(*records: object) -> dict[str, Any]:
    return {"keys": list(records)}


async def accepted(provider: StaticTokenProvider, key: str) -> bool:
    return isinstance(await provider.verify_token(key), AccessToken)


async def refused(provider: StaticTokenProvider, key: str) -> bool:
    return await provider.verify_token(key) is None


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = WATCH_BOUND) -> None:
    with anyio.fail_after(seconds):
        while not await check():
            await anyio.sleep(0.05)


def keys_cli(*args: str, cwd: Path, command: tuple[str, ...] = PYTHON_M) -> Any:
    return run("keys", *args, cwd=cwd, command=command)


def new_key_cli(path: Path, *args: str, sub: str = "alice", command: tuple[str, ...] = PYTHON_M) -> tuple[str, str]:
    """``keys new``: the key (first line, shown once) and its id."""
    result = keys_cli("new", "--file", str(path), "--sub", sub, *args, cwd=path.parent, command=command)
    assert result.returncode == 0 and result.stderr == "", result
    key, note = result.stdout.splitlines()
    register(key)
    key_id = mcp_bearer._key_id(key)
    assert key_id and note == f"(shown once: store it now; {path} keeps only its digest, id {key_id})"
    return key, key_id


# --- the keys ------------------------------------------------------------------------------


def test_new_keys_are_prefixed_unique_and_carry_a_checksum() -> None:
    made = [new_api_key() for _ in range(500)]
    for key, key_id in made:
        shape = KEY_SHAPE.fullmatch(key)
        assert shape is not None and shape[1] == key_id == mcp_bearer._key_id(key), key_id
    assert len({key for key, _ in made}) == len({key_id for _, key_id in made}) == 500
    # 32 base62 characters of secret (190 bits): every symbol turns up in 16,000 of them.
    assert set("".join(key[18:50] for key, _ in made)) == set(BASE62)


def typos(key: str) -> Iterator[str]:
    """Every single-character substitution after the prefix, adjacent transposition, deletion and insertion."""
    for n in range(len(KEY_PREFIX), len(key)):
        for c in BASE62 + "_":
            if c != key[n]:
                yield key[:n] + c + key[n + 1 :]
        if n + 1 < len(key) and key[n] != key[n + 1]:
            yield key[:n] + key[n + 1] + key[n] + key[n + 2 :]
        yield key[:n] + key[n + 1 :]
        yield key[:n] + "x" + key[n:]


def test_every_typo_of_a_key_fails_its_checksum_is_refused_and_cannot_be_listed() -> None:
    """A mistyped key is refused with its reason, and a provider refuses to list one (it could never match)."""
    key = fresh_key()
    mistyped = set(typos(key))
    assert len(mistyped) > 3000
    provider = StaticTokenProvider({key: {"sub": "alice"}})

    async def verdicts() -> list[tuple[str, AccessToken | None, str | None]]:
        seen = []
        for token in sorted(mistyped):
            access = await provider.verify_token(token)
            seen.append((token, access, mcp_bearer._refusal_reason.get()))
        return seen

    for token, access, reason in anyio.run(verdicts):
        assert (mcp_bearer._key_id(token), access) == ("", None), token
        assert reason == "malformed API key (its checksum does not hold)"
    assert isinstance(anyio.run(provider.verify_token, key), AccessToken)
    for token in sorted(mistyped)[::97]:
        with pytest.raises(ValueError, match=r"^token #2 starts with mcpb_ but its checksum does not hold") as caught:
            StaticTokenProvider({key: {"sub": "alice"}, token: {"sub": "mallory"}})
        assert token not in str(caught.value)


def with_checksum(body: str) -> str:
    """A token of our prefix whose checksum holds, whatever the body: only the shape can refuse it."""
    return body + mcp_bearer._checksum(body)


FOREIGN = [
    "mcpb_",
    "mcpb_x",
    with_checksum("mcpb_ABCDEF012345_" + "a" * 32),  # upper-case id
    with_checksum("mcpb_abcdef01234_" + "a" * 32),  # 11 hex digits
    with_checksum("mcpb_abcdef0123456_" + "a" * 31),  # 13
    with_checksum("mcpb_abcdef012345_" + "a" * 31),  # a short secret
    with_checksum("mcpb_abcdef012345_" + "a" * 33),
    with_checksum("mcpb_abcdef012345" + "a" * 33),  # no separator
    with_checksum("mcpb_abcdef012345__" + "a" * 31),
    with_checksum("mcpb_abcdef012345_" + "a" * 31 + "-"),
    with_checksum("mcpb_abcdef012345_" + "a" * 32) + "=",  # token68 padding
    with_checksum("mcpb_abcdef012345_" + "a" * 32)[:-1],
]


@pytest.mark.parametrize("token", FOREIGN, ids=range(len(FOREIGN)))
def test_tokens_shaped_like_ours_are_refused_before_any_lookup(token: str) -> None:
    SECRETS.add(token)
    with pytest.raises(ValueError, match="starts with mcpb_ but its checksum does not hold"):
        StaticTokenProvider({token: {"sub": "mallory"}})  # it could never be used: said at startup
    provider = FakeProvider(otherwise=verdict("mallory"))  # a provider that would accept anything
    assert mcp_bearer._key_id(token) == ""
    assert Harness(provider).request(bearer(token)).status == 401
    assert provider.calls == []
    # Only the prefix, exactly, is ours: another token is looked up as any plain API key.
    other = "MCPB_" + token.removeprefix("mcpb_")
    SECRETS.add(other)
    assert Harness(StaticTokenProvider({other: {"sub": "ok"}})).request(bearer(other)).status == 200


# --- the keys file ----------------------------------------------------------------------


@pytest.mark.slow
def test_keys_new_prints_the_key_once_and_stores_its_digest_claims_scopes_and_expiry(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    before = int(time.time())
    claims = ["--claim", "team=ops", "--claim", "level=3", "--claim", 'groups=["a", "b"]', "--claim", "note=not {json"]
    key, key_id = new_key_cli(path, "--scope", "read", "--scope", "mcp:tools", "--expires-in", "90d", *claims)
    after = int(time.time())
    text = path.read_text()
    assert key not in text and stat.S_IMODE(path.stat().st_mode) == 0o600
    (stored,) = json.loads(text)["keys"]
    assert set(stored) == {"id", "sha256", "claims", "scopes", "created_at", "expires_at"}
    assert (stored["id"], stored["sha256"]) == (key_id, hashlib.sha256(key.encode()).hexdigest())
    assert stored["claims"] == {"sub": "alice", "team": "ops", "level": 3, "groups": ["a", "b"], "note": "not {json"}
    assert stored["scopes"] == ["read", "mcp:tools"]
    assert before <= stored["created_at"] <= after and stored["expires_at"] == stored["created_at"] + 90 * 86400
    access = anyio.run(StaticTokenProvider.from_file(path).verify_token, key)
    assert access is not None and (access.claims, access.scopes) == (stored["claims"], ["read", "mcp:tools"])
    assert (access.expires_at, access.source) == (stored["expires_at"], "mcp_bearer:api-key")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("duration", "seconds"), [("12h", 43200), ("30m", 1800), ("3600s", 3600), ("45", 45), ("1d", 86400)]
)
def test_keys_new_expires_in_units(tmp_path: Path, duration: str, seconds: int) -> None:
    new_key_cli(tmp_path / "keys.json", "--expires-in", duration)
    (stored,) = json.loads((tmp_path / "keys.json").read_text())["keys"]
    assert stored["expires_at"] - stored["created_at"] == seconds


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        *[
            (
                [f"--expires-in={bad}"],
                f"--expires-in {bad!r} must be a whole number and a unit, e.g. 90d, 12h, 30m, 3600s",
            )
            for bad in ("0d", "-1d", "1.5h", "1w", "d", "", " 1d", "1d ", "01d", "1 d")
        ],
        *[
            (["--claim", bad], f"--claim {bad!r} must be KEY=VALUE, KEY not sub, scope or scopes")
            for bad in ("sub=mallory", "scope=admin", "scopes=[]", "no-equals", "=value")
        ],
        (["--scope", "two words"], "scope 'two words' is not an RFC 6749 scope-token"),
        (["--scope", 'a"b'], "is not an RFC 6749 scope-token"),
    ],
)
def test_keys_new_refuses_bad_input_and_writes_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "keys.json"
    result = keys_cli("new", "--file", str(path), "--sub", "alice", *args, cwd=tmp_path)
    assert message in one_error_line(result) and result.stdout == ""
    assert not path.exists() and os.listdir(tmp_path) == []


def test_from_file_reads_both_formats_and_scope_as_a_string(tmp_path: Path) -> None:
    """RFC 6749 section 3.3: "scope" is space-separated; a part that is no scope-token is no scope."""
    plain = {"sk-one-Wq3Zr8": {"sub": "a", "scope": "read  write"}, "sk-two-Pk5Lm2": {"scopes": ["x"]}}
    plain["sk-three-Hd7Tx4"] = {"scope": "read\twrite admin"}
    SECRETS.update(plain)
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    provider = StaticTokenProvider.from_file(tmp_path / "plain.json")
    scopes = [anyio.run(provider.verify_token, token).scopes for token in plain]  # type: ignore[union-attr]
    assert scopes == [["read", "write"], ["x"], ["admin"]]
    one, two, three = fresh_key(), fresh_key(), fresh_key()
    records = [record(one, scopes=None), record(two), record(three)]
    records[0] = {k: v for k, v in records[0].items() if k != "scopes"} | {"scope": "read write"}
    del records[1]["scopes"]
    records[1]["claims"]["scopes"] = ["from-claims"]
    records[2]["scopes"] = ["top"]
    (tmp_path / "keys.json").write_text(json.dumps(keys_of(*records)))
    provider = StaticTokenProvider.from_file(tmp_path / "keys.json")
    scopes = [anyio.run(provider.verify_token, key).scopes for key in (one, two, three)]  # type: ignore[union-attr]
    assert scopes == [["read", "write"], ["from-claims"], ["top"]]


GOOD = fresh_key()
BROKEN: list[tuple[str, str | bytes, str]] = [
    ("empty", "", "is not valid JSON: Expecting value at line 1"),
    ("not-json", '{"keys": [', "is not valid JSON"),
    ("no-keys", "{}", "holds no keys: a server nobody can use"),
    ("no-records", '{"keys": []}', "holds no keys"),
    ("a-list", "[]", 'must hold a JSON object: {token: claims}, or a keys file {"keys": [...]}'),
    ("record-not-an-object", json.dumps(keys_of(record(GOOD), 1)), "key #2 must be an object with id, sha256"),
    ("claims-a-list", json.dumps(keys_of(record(GOOD, claims=["x"]))), "key #1 must be an object"),
    ("digest-not-hex", json.dumps(keys_of(record(GOOD), record(GOOD, sha256="zz"))), 'key #2: "sha256" must be the 64'),
    ("expiry-a-string", json.dumps(keys_of(record(GOOD, expires_at="soon"))), 'key #1: "expires_at" must be Unix'),
    ("expiry-a-bool", json.dumps(keys_of(record(GOOD, expires_at=True))), 'key #1: "expires_at" must be Unix'),
    ("scopes-a-string", json.dumps(keys_of(record(GOOD, scopes="read"))), 'key #1: "scopes" must be a list of strings'),
    ("scopes-not-strings", json.dumps(keys_of(record(GOOD, scopes=[1]))), 'key #1: "scopes" must be a list'),
    ("scope-a-list", json.dumps(keys_of({**record(GOOD, scopes=None), "scope": ["read"]})), '"scopes" must be a'),
    ("plain-claims-a-string", json.dumps({BOB: "bob"}), "claims of token #1 must be a mapping, not str"),
    ("plain-scopes-a-string", json.dumps({BOB: {"scopes": "read"}}), 'token #1: "scopes" must be a list'),
    ("plain-not-a-token", json.dumps({BOB: {}, "two words": {}}), "token #2 is not a non-empty RFC 6750 token"),
    ("plain-empty-token", json.dumps({"": {}}), "token #1 is not a non-empty RFC 6750 token"),
    ("not-utf-8", b'{"\xff": {}}', "is not UTF-8"),
]


@pytest.mark.parametrize(("content", "message"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_a_file_of_another_shape_is_one_error_naming_the_file_and_the_key(
    tmp_path: Path, content: str | bytes, message: str
) -> None:
    path = tmp_path / "keys.json"
    write(path, content)
    with pytest.raises(ValueError) as raised:
        StaticTokenProvider.from_file(path)
    text = str(raised.value)
    assert str(path) in text and message in text and "\n" not in text, text
    assert not [s for s in SECRETS if s in text]
    # The command line says the same in one line, in the words of its flag.
    line = one_error_line(run("--tokens-file", str(path), "--port", "0"))
    assert line.startswith("--tokens-file: ") and str(path) in line and message in line


def test_a_key_past_its_expiry_is_refused_with_the_reason_expired(tmp_path: Path) -> None:
    past, future, never, nan = fresh_key(), fresh_key(), fresh_key(), fresh_key()
    records = [record(past, expires_at=time.time() - 1), record(future, expires_at=time.time() + 3600), record(never)]
    text = json.dumps(keys_of(*records, record(nan)))
    (tmp_path / "keys.json").write_text(text.replace('"expires_at": null}]', '"expires_at": NaN}]'))  # json reads NaN
    harness = Harness(StaticTokenProvider.from_file(tmp_path / "keys.json"))
    with mcp_bearer_log() as records_logged:
        outcome = harness.request(bearer(past))
    assert (outcome.status, outcome.json()) == (401, INVALID_TOKEN)
    assert [r.args for r in records_logged if r.msg == "token refused: %r"] == [("expired",)]
    assert [harness.request(bearer(key)).status for key in (future, never, nan)] == [200, 200, 401]


# --- following the file while the server runs -------------------------------------------


@pytest.mark.slow  # waits out the once-a-second check in real time
@pytest.mark.parametrize("in_place", [False, True], ids=["renamed-over", "edited-in-place"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_watched_file_takes_added_and_revoked_keys_without_restart(
    tmp_path: Path, backend: str, in_place: bool
) -> None:
    old, new = fresh_key(), fresh_key()
    path = tmp_path / "keys.json"
    write(path, keys_of(record(old)))
    provider = StaticTokenProvider.from_file(path)

    async def scenario() -> None:
        assert await accepted(provider, old) and not await accepted(provider, new)
        write(path, keys_of(record(old), record(new, sub="alice-new")), in_place=in_place)
        await eventually(lambda: accepted(provider, new))
        assert await accepted(provider, old)
        access = await provider.verify_token(new)
        assert access is not None and access.claims == {"sub": "alice-new"}
        write(path, keys_of(record(new)), in_place=in_place)
        await eventually(lambda: refused(provider, old))
        assert await accepted(provider, new)

    anyio.run(scenario, backend=backend)


@pytest.mark.slow  # waits out the once-a-second check in real time
def test_an_unwatched_file_is_read_once(tmp_path: Path) -> None:
    old, new = fresh_key(), fresh_key()
    path = tmp_path / "keys.json"
    write(path, keys_of(record(old)))
    provider = StaticTokenProvider.from_file(path, watch=False)

    async def scenario() -> None:
        write(path, keys_of(record(new)))
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert await accepted(provider, old) and not await accepted(provider, new)
            await anyio.sleep(0.05)

    anyio.run(scenario)
    with pytest.raises(TypeError, match="watch must be True or False"):
        StaticTokenProvider.from_file(path, watch="no")  # type: ignore[arg-type]


def replace_with_a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.slow  # waits out the once-a-second check in real time
def test_a_broken_edit_keeps_the_last_good_set_and_logs_one_error_per_version(tmp_path: Path) -> None:
    """An operator's typo must not lock every user out, nor fill the log once a second."""
    cases: list[tuple[Path, Callable[[Path], None], str]] = []
    for name, content, message in BROKEN:
        cases.append((tmp_path / f"{name}.json", lambda p, c=content: write(p, c), message))  # type: ignore[misc]
    cases.append((tmp_path / "deleted.json", lambda p: p.unlink(), "No such file or directory"))
    cases.append((tmp_path / "a-directory.json", replace_with_a_directory, "Is a directory"))
    old, new = fresh_key(), fresh_key()
    for path, _, _ in cases:
        write(path, keys_of(record(old)))
    providers = [StaticTokenProvider.from_file(path) for path, _, _ in cases]

    def errors(records: list[logging.LogRecord], path: Path) -> list[str]:
        return [r.getMessage() for r in records if r.levelno >= logging.ERROR and f"{str(path)!r}" in r.getMessage()]

    async def serving_through(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for provider in providers:
                assert await accepted(provider, old)  # never raises, never forgets
            await anyio.sleep(0.05)

    async def scenario(records: list[logging.LogRecord]) -> None:
        for path, breaking, _ in cases:
            breaking(path)
        await serving_through(2.5)  # two checks and more: one error each, not one per check
        for path, _, message in cases:
            (line,) = errors(records, path)
            assert message in line and line.endswith("; keeping the last good set of keys"), line
        for path, _, _ in cases:
            if path.is_dir():
                path.rmdir()
            write(path, keys_of(record(new)))
        for provider in providers:
            await eventually(lambda p=provider: accepted(p, new))  # type: ignore[misc]
            assert not await accepted(provider, old)
        for path, breaking, _ in cases:  # broken again: a new version, a new error
            breaking(path)
        await anyio.sleep(1.5)
        for provider in providers:
            await eventually(lambda p=provider: accepted(p, new))  # type: ignore[misc]
        for path, _, _ in cases:
            assert len(errors(records, path)) == 2, path

    with mcp_bearer_log() as records:
        anyio.run(scenario, records)


def release_readers(path: Path, provider: StaticTokenProvider) -> None:
    """Give a worker thread stuck opening the FIFO its writer, until no check is left waiting on it."""
    deadline = time.monotonic() + 10
    check = provider._file._check if provider._file else None
    while check is not None and not check.done() and time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # ENXIO: nobody has it open for reading yet
            descriptor = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.write(descriptor, json.dumps(keys_of(record(GOOD))).encode())
            os.close(descriptor)
        time.sleep(0.05)
    assert check is None or check.done(), "a worker thread is still stuck on the FIFO"


@pytest.mark.slow  # waits out the once-a-second check in real time
def test_the_file_is_read_off_the_event_loop_and_a_hung_read_holds_up_no_request(tmp_path: Path) -> None:
    """A keys file on a stalled network mount: a FIFO blocks whoever opens it until someone writes."""
    old, new = fresh_key(), fresh_key()
    path = tmp_path / "keys.json"
    write(path, keys_of(record(old)))
    provider = StaticTokenProvider.from_file(path)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    def fill_fifo_after(seconds: float, content: dict[str, Any]) -> threading.Thread:
        def fill() -> None:
            time.sleep(seconds)
            with open(path, "w") as fifo:  # blocks until the reader has it open
                json.dump(content, fifo)

        thread = threading.Thread(target=fill, daemon=True)
        thread.start()
        return thread

    async def scenario() -> None:
        nonlocal ticks
        async with anyio.create_task_group() as group:
            group.start_soon(ticker)
            await anyio.sleep(1.1)
            path.unlink()
            os.mkfifo(path)
            filler = fill_fifo_after(0.5, keys_of(record(old), record(new)))
            ticks = 0
            with anyio.fail_after(10):
                assert await accepted(provider, new)  # this request waited for the read...
            assert ticks >= 10, ticks  # ...and the loop kept running meanwhile
            filler.join(10)
            # Nobody writes now: the read hangs. Requests go on with the keys in hand.
            path.unlink()
            os.mkfifo(path)
            await anyio.sleep(1.1)
            started = time.monotonic()
            with anyio.fail_after(15):
                assert await accepted(provider, new)  # the one request that started the check waits at most 5 s
            assert time.monotonic() - started < 10
            await anyio.sleep(1.1)  # due again, the read still hung: nobody else waits for it
            with anyio.fail_after(1):
                assert await accepted(provider, old)
            group.cancel_scope.cancel()

    try:
        anyio.run(scenario)
    finally:
        release_readers(path, provider)


OPENED: list[str] = []
WATCHED: set[str] = set()


def count_opens(event: str, args: tuple[Any, ...]) -> None:
    """A PEP 578 audit hook: the interpreter reports every open(), whoever calls it."""
    if event == "open" and WATCHED and args and args[0] in WATCHED:
        OPENED.append(args[0])


sys.addaudithook(count_opens)


@pytest.mark.slow  # waits out the once-a-second check in real time
def test_the_file_is_checked_at_most_once_a_second_by_one_worker_for_all_requests(tmp_path: Path) -> None:
    key = fresh_key()
    path = tmp_path / "keys.json"
    write(path, keys_of(record(key)))
    provider = StaticTokenProvider.from_file(path)
    stop = threading.Event()

    def keep_changing() -> None:  # a new inode each time: every check finds the file changed
        while not stop.is_set():
            write(path, keys_of(record(key)))
            time.sleep(0.02)

    async def scenario() -> tuple[int, float]:
        changer = threading.Thread(target=keep_changing, daemon=True)
        started = time.monotonic()
        changer.start()
        try:
            while time.monotonic() - started < 3:
                assert await accepted(provider, key)
                await anyio.sleep(0.005)
        finally:
            stop.set()
            changer.join(10)
        elapsed = time.monotonic() - started
        await anyio.sleep(1.5)  # let the last check finish
        return len(OPENED), elapsed

    WATCHED.add(str(path))
    try:
        opens, elapsed = anyio.run(scenario)
        assert 1 <= opens <= elapsed + 2, (opens, elapsed)
        write(path, keys_of(record(key)))
        time.sleep(1.1)
        OPENED.clear()

        async def at_once() -> list[bool]:
            results: list[bool] = []

            async def one() -> None:
                results.append(await accepted(provider, key))

            async with anyio.create_task_group() as group:
                for _ in range(50):
                    group.start_soon(one)
            return results

        assert anyio.run(at_once) == [True] * 50
        assert len(OPENED) == 1  # fifty requests, one read
    finally:
        WATCHED.discard(str(path))
        OPENED.clear()


# --- mcp-bearer keys: new, list, revoke -----------------------------------------------------

LISTED = re.compile(
    r"(?P<id>[0-9a-f]{12})  sub='(?P<sub>[a-z]+)'  scopes=(?P<scopes>.+)  "
    r"created=(?P<created>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)  expires=(?P<expires>.+)"
)


@pytest.mark.slow
def test_keys_list_says_what_each_key_is_never_the_key_nor_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    alice, alice_id = new_key_cli(path, "--scope", "read", "--scope", "mcp:tools", "--expires-in", "90d")
    bob, bob_id = new_key_cli(path, sub="bob")
    carol, carol_id = new_key_cli(path, "--expires-in", "1h", sub="carol")
    document = json.loads(path.read_text())
    document["keys"][2]["expires_at"] = int(time.time()) - 60  # an hour later, and then some
    write(path, document)
    result = keys_cli("list", "--file", str(path), cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    lines = [LISTED.fullmatch(line) for line in result.stdout.splitlines()]
    assert all(lines) and len(lines) == 3, result.stdout
    listed = [m.groupdict() for m in lines if m]
    assert [(m["id"], m["sub"], m["scopes"]) for m in listed] == [
        (alice_id, "alice", "read mcp:tools"),
        (bob_id, "bob", "-"),
        (carol_id, "carol", "-"),
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", listed[0]["expires"])
    assert listed[1]["expires"] == "never" and listed[2]["expires"].endswith("Z (expired)")
    assert KEY_PREFIX not in result.stdout and not re.search(r"[0-9a-f]{13}", result.stdout)  # ids have 12 hex
    assert not [s for s in SECRETS if s in result.stdout]
    assert alice not in result.stdout and bob not in result.stdout and carol not in result.stdout


@pytest.mark.slow
@ENTRY_POINTS
def test_keys_commands_from_every_entry_point(tmp_path: Path, command: tuple[str, ...]) -> None:
    path = tmp_path / "keys.json"
    key, key_id = new_key_cli(path, command=command)
    other, _ = new_key_cli(path, sub="bob", command=command)
    listed = keys_cli("list", "--file", str(path), cwd=tmp_path, command=command).stdout.splitlines()
    assert [line[:12] for line in listed] == [key_id, mcp_bearer._key_id(other)]
    result = keys_cli("revoke", "--file", str(path), key_id, cwd=tmp_path, command=command)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"revoked {key_id}\n", "")
    provider = StaticTokenProvider.from_file(path)
    assert anyio.run(provider.verify_token, key) is None and anyio.run(provider.verify_token, other) is not None
    usage = keys_cli("--help", cwd=tmp_path, command=command).stdout
    prog = "mcp-bearer" if command == CONSOLE_SCRIPT else "python -m mcp_bearer"
    assert usage.startswith(f"usage: {prog} keys "), usage


@pytest.mark.slow
def test_keys_revoke_removes_exactly_one_key_and_an_unknown_one_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    made = [new_key_cli(path, sub=sub) for sub in ("alice", "bob", "carol")]
    assert keys_cli("revoke", "--file", str(path), made[1][1], cwd=tmp_path).returncode == 0
    assert [r["id"] for r in json.loads(path.read_text())["keys"]] == [made[0][1], made[2][1]]
    before = path.read_bytes()
    for unknown in (made[1][1], "0123456789ab"):  # gone already; never made
        assert (
            one_error_line(keys_cli("revoke", "--file", str(path), unknown, cwd=tmp_path))
            == f"no key {unknown!r} in {path}"
        )
    # The key itself pasted for its id: refused, and not shown again on a terminal or in a CI log.
    result = keys_cli("revoke", "--file", str(path), made[0][0], cwd=tmp_path)
    assert one_error_line(result) and made[0][0] not in result.stderr + result.stdout
    assert path.read_bytes() == before
    for command in (
        ["revoke", "--file", str(tmp_path / "none.json"), "x"],
        ["list", "--file", str(tmp_path / "none.json")],
    ):
        assert one_error_line(keys_cli(*command, cwd=tmp_path)) == f"no keys file {str(tmp_path / 'none.json')!r}"
    for command in ([], ["new", "--file", str(path)], ["frobnicate"], ["revoke", "--file", str(path)]):
        one_error_line(keys_cli(*command, cwd=tmp_path))
    assert path.read_bytes() == before


@pytest.mark.slow
def test_keys_file_is_replaced_whole_with_mode_0600(tmp_path: Path) -> None:
    """A server re-reading the file must never see half of it; others must never read it."""
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "keys.json"
    new_key_cli(path)
    path.chmod(0o644)
    inode = path.stat().st_ino
    seen: list[str] = []
    stop = threading.Event()

    def read_all_the_time() -> None:
        while not stop.is_set():
            try:
                seen.append("ok" if json.loads(path.read_text())["keys"] else "empty")
            except (ValueError, OSError) as exc:
                seen.append(f"{type(exc).__name__}: {exc}")

    reader = threading.Thread(target=read_all_the_time, daemon=True)
    reader.start()
    try:
        for n in range(12):
            result = keys_cli("new", "--file", "conf/keys.json", "--sub", f"user{n}", cwd=tmp_path)
            assert result.returncode == 0
            register(result.stdout.splitlines()[0])
            if n == 0:  # both inodes existed at once, so they differ: renamed over, not rewritten
                assert path.stat().st_ino != inode
    finally:
        stop.set()
        reader.join(10)
    assert set(seen) == {"ok"}, {s for s in seen if s != "ok"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path / "conf")) == ["keys.json"] and sorted(os.listdir(tmp_path)) == ["conf"]
    assert len(json.loads(path.read_text())["keys"]) == 13


@pytest.mark.slow
def test_keys_commands_refuse_a_plain_tokens_file_and_never_show_it(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({BOB: {"sub": "bob"}}))
    before = path.read_bytes()
    for command in (["list", "--file", str(path)], ["new", "--file", str(path), "--sub", "x"]):
        result = keys_cli(*command, cwd=tmp_path)
        assert one_error_line(result).startswith(f'{path} is not a keys file ({{"keys": [...]}})')
        assert BOB not in result.stdout + result.stderr and result.stdout == ""
    assert path.read_bytes() == before
    write(path, keys_of(record(GOOD), record(GOOD, sha256="zz")))
    message = one_error_line(keys_cli("list", "--file", str(path), cwd=tmp_path))
    assert message == f'{path}: key #2: "sha256" must be the 64 hex digits of the key\'s SHA-256'


# --- a server following the file ------------------------------------------------------------


async def rotate_with_overlap(base: str, path: Path) -> None:
    """The rotation the README describes: a new key, both work, the old one revoked, refused within 2 s."""
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    old, old_id = new_key_cli(path)
    await eventually(lambda: anyio.to_thread.run_sync(lambda: post_initialize(base, old) == 200))
    assert await whoami_on_both_generations(base + "/mcp", old)
    async with (
        httpx.AsyncClient(headers={"Authorization": f"Bearer {old}"}, timeout=30) as client,
        streamable_http_client(base + "/mcp", http_client=client) as streams,
        ClientSession(streams[0], streams[1]) as session,
    ):
        await session.initialize()
        assert (await call_json(session, "whoami"))["token"] == fingerprint(old)
        new, _ = await anyio.to_thread.run_sync(lambda: new_key_cli(path))
        await eventually(lambda: anyio.to_thread.run_sync(lambda: post_initialize(base, new) == 200))
        assert await anyio.to_thread.run_sync(lambda: post_initialize(base, old)) == 200  # the overlap
        # The client switches keys mid-session: the same user, so the session is still theirs.
        client.headers["Authorization"] = f"Bearer {new}"
        assert (await call_json(session, "whoami"))["token"] == fingerprint(new)
        result = await anyio.to_thread.run_sync(
            lambda: keys_cli("revoke", "--file", str(path), old_id, cwd=path.parent)
        )
        assert result.returncode == 0
        await eventually(lambda: anyio.to_thread.run_sync(lambda: post_initialize(base, old) == 401))
        assert (await call_json(session, "whoami"))["token"] == fingerprint(new)
    seen = await whoami_on_both_generations(base + "/mcp", new)
    assert {fingerprint(new)} == {s["token"] for s in seen}


@pytest.mark.slow
@pytest.mark.anyio
async def test_cli_rotates_a_key_with_overlap_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    new_key_cli(path, sub="ops")
    with served(user_module(tmp_path), "--tokens-file", "keys.json", cwd=tmp_path) as server:
        assert server.banner()[1] == "  tokens: 1 API keys from keys.json (re-read when it changes)"
        await rotate_with_overlap(server.base, path)
        assert server.process.poll() is None  # the same process throughout
    assert ours(server.stderr) == []  # a keys file at 0600: nothing to warn about, nothing went wrong


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("root_path", ["", "/api"])
async def test_rotating_a_key_under_uvicorn_with_a_root_path(tmp_path: Path, root_path: str) -> None:
    path = tmp_path / "keys.json"
    new_key_cli(path, sub="ops")
    app = BearerAuthMiddleware(mcp_app(whoami), StaticTokenProvider.from_file(path))
    with serve(app, root_path=root_path) as base:
        await rotate_with_overlap(base, path)


@pytest.mark.slow
def test_cli_warns_once_of_plain_keys_and_of_a_file_others_can_read(tmp_path: Path) -> None:
    plain = tmp_path / "tokens.json"
    plain.write_text(json.dumps({BOB: {"sub": "bob"}}))
    plain.chmod(0o644)
    with served("--tokens-file", "tokens.json", cwd=tmp_path) as server:
        assert post_initialize(server.base, BOB) == 200
        write(plain, {BOB: {"sub": "bob"}, "sk-added-Tq4Xw9": {"sub": "x"}})  # re-read: no second warning
        SECRETS.add("sk-added-Tq4Xw9")
        time.sleep(2.5)
        assert post_initialize(server.base, "sk-added-Tq4Xw9") == 200
    assert ours(server.stderr) == [
        "tokens file 'tokens.json' holds keys in plain text: anyone who can read it can use them "
        "(mcp-bearer keys new keeps only their digests)",
        "tokens file 'tokens.json' can be read by group or others: chmod 600 tokens.json",
    ]


@pytest.mark.slow
def test_cli_a_broken_edit_is_one_error_line_and_the_server_keeps_serving(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, _ = new_key_cli(path)
    with served(user_module(tmp_path), "--tokens-file", "keys.json", cwd=tmp_path) as server:
        assert post_initialize(server.base, key) == 200
        text = path.read_text()
        path.write_text(text[: len(text) // 2])  # an editor saved half a file
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert post_initialize(server.base, key) == 200
        (line,) = ours(server.stderr)
        assert line.startswith("keys file 'keys.json' cannot be used (keys.json is not valid JSON: ")
        path.write_text(text)
        new, _ = new_key_cli(path)
        assert until(lambda: post_initialize(server.base, new) == 200)
        assert post_initialize(server.base, key) == 200


def ours(lines: list[str]) -> list[str]:
    """What mcp_bearer itself wrote to stderr (mcp 2.x has the root logger print the SDK's INFO records too)."""
    return [line for line in lines if line.startswith(("tokens file ", "keys file ", "mcp_bearer"))]


def until(condition: Callable[[], bool], seconds: float = WATCH_BOUND) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow
def test_no_key_nor_its_digest_reaches_the_listing_the_logs_or_the_banner(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = [new_key_cli(path, "--scope", "read", sub=sub) for sub in ("alice", "bob")]
    unlisted, typo = fresh_key(), keys[0][0][:-1] + ("A" if keys[0][0][-1] != "A" else "B")
    register(typo)
    listing = keys_cli("list", "--file", str(path), cwd=tmp_path).stdout
    with served(user_module(tmp_path), "--tokens-file", "keys.json", "--audit", cwd=tmp_path) as server:
        assert [post_initialize(server.base, key) for key, _ in keys] == [200, 200]
        assert [post_initialize(server.base, key) for key in (unlisted, typo, "")] == [401, 401, 401]
        keys_cli("revoke", "--file", str(path), keys[1][1], cwd=tmp_path)
        assert until(lambda: post_initialize(server.base, keys[1][0]) == 401)
        text = path.read_text()
        path.write_text(text.replace('"sha256"', '"sha256" 1'))  # broken: its ERROR line quotes nothing of it
        time.sleep(1.1)
        assert post_initialize(server.base, keys[0][0]) == 200  # files are checked when requests come
        assert until(lambda: any("cannot be used" in line for line in server.stderr))
    printed = "\n".join([listing, *server.stdout, *server.stderr])
    assert "mcp_bearer.audit" in printed and "cannot be used" in printed
    leaked = [s[:10] for s in SECRETS if s in printed]
    assert leaked == []
    # In this process, with every record kept at DEBUG: the provider, its repr and its errors.
    with mcp_bearer_log() as records:
        good = path.with_name("good.json")
        write(good, keys_of(record(keys[0][0])))
        provider = StaticTokenProvider.from_file(good)
        harness = Harness(provider, audit=True)
        assert [harness.request(bearer(k)).status for k in (keys[0][0], unlisted, typo)] == [200, 401, 401]
    texts = [repr(provider)] + [logging.Formatter().format(r) for r in records]
    assert not [s[:10] for s in SECRETS for t in texts if s in t]
