"""The network helper, the one place that touches the network: which endpoints it accepts, and
how it bounds time and size and refuses redirects."""

from __future__ import annotations

import functools
import json
import socket
import time
from typing import Any

import anyio
import pytest

import mcp_bearer
from support import (
    BOB,
    HMAC_SECRET,
    JWKSEndpoint,
)

# The helper is private to mcp_bearer: the tests reach it through these two names only.
checked_endpoint = mcp_bearer._checked_endpoint
http_call = mcp_bearer._http_call


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://auth.example.com/jwks", True),
        ("https://auth.example.com:8443/jwks?tenant=a", True),
        ("http://localhost:8080/jwks", True),
        ("http://127.0.0.1/jwks", True),
        ("http://127.9.9.9/jwks", True),
        ("http://[::1]:8080/x", True),
        ("http://auth.example.com/jwks", False),
        ("http://localhost.evil.com/jwks", False),
        ("http://127.0.0.1.nip.io/jwks", False),
        ("http://[::ffff:10.0.0.1]/x", False),
        ("https://a@auth.example.com/jwks", False),
        ("https://auth.example.com/jwks#", False),
        ("file:///etc/passwd", False),
        ("https:///jwks", False),
    ],
)
def test_checked_endpoint(url: str, allowed: bool) -> None:
    if allowed:
        assert checked_endpoint("jwks_url", url) == url
    else:
        with pytest.raises(ValueError, match="jwks_url"):
            checked_endpoint("jwks_url", url)


@pytest.mark.parametrize("url", ["https://u:pw-Hx7Tq2@auth.example.com/\njwks", "https://u:pw-Hx7Tq2@a.example/k"])
def test_a_refused_endpoint_never_quotes_its_password(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        checked_endpoint("url", url)
    assert "pw-Hx7Tq2" not in str(refused.value)


def test_http_call_bounds_time_and_size_and_follows_no_redirect(jwks: JWKSEndpoint) -> None:
    url = jwks.url

    async def call(**options: Any) -> tuple[int, bytes]:
        return await http_call(url, timeout=options.pop("timeout", 2.0), **options)

    status, body = anyio.run(call)
    assert status == 200 and json.loads(body)["keys"]
    jwks.mode = "redirect"
    assert anyio.run(call)[0] == 302 and "/moved-keys" not in jwks.paths
    jwks.mode = "500"
    assert anyio.run(call)[0] == 500  # a status, not an exception
    jwks.mode = "oversize"
    with pytest.raises(OSError, match="larger than 1048576 bytes"):
        anyio.run(call)
    jwks.mode = "hang"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        anyio.run(functools.partial(call, timeout=0.3))
    assert time.monotonic() - started < 1.5
    jwks.release.set()
    jwks.mode = "ok"
    secret_headers = {"authorization": "Basic " + HMAC_SECRET}
    assert anyio.run(functools.partial(call, body=b"token=" + BOB.encode(), headers=secret_headers))[0] == 200
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    with pytest.raises(OSError) as refused:
        anyio.run(functools.partial(http_call, f"http://127.0.0.1:{closed.getsockname()[1]}/", timeout=2.0))
    closed.close()
    assert HMAC_SECRET not in str(refused.value)
