"""Fixtures every test file shares: the log capture and its scan for secrets, Hypothesis profiles,
and the loopback servers more than one file needs. The helpers they use are in support.py."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from mcp_bearer import BearerAuthMiddleware
from support import (
    MCP_MAJOR,
    FakeProvider,
    IntrospectionEndpoint,
    JWKSEndpoint,
    ListHandler,
    assert_no_secret_logged,
    mcp_app,
    serve,
    whoami,
    whoami_async,
)

# Property tests: 2,000 examples each in CI; HYPOTHESIS_PROFILE=long (or --hypothesis-profile=long)
# runs 50,000 by hand.
settings.register_profile("ci", max_examples=2_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=50_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On mcp 1.x, tests of what only MCP 2026-07-28 has (requestState, Mcp-Name) have nothing to check."""
    if MCP_MAJOR == 2:
        return
    modern = [item for item in items if item.get_closest_marker("modern_only")]
    if modern:
        config.hook.pytest_deselected(items=modern)
        items[:] = [item for item in items if not item.get_closest_marker("modern_only")]


@pytest.fixture(autouse=True, scope="session")
def capture_all_logs() -> Iterator[None]:
    """Every record of every logger, any level, from every thread, checked at the end for secrets."""
    handler = ListHandler()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.NOTSET)
    yield
    root.removeHandler(handler)
    root.setLevel(old_level)
    assert_no_secret_logged(handler.records)


@pytest.fixture(scope="session", autouse=True)
def quiet_http_clients() -> None:
    # httpx logs every request URL at INFO; harmless, but keep the capture small.
    for name in ("httpx", "httpx2", "httpcore", "mcp"):
        logging.getLogger(name).setLevel(logging.WARNING)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def stateful_url() -> Iterator[str]:
    """The SDK's stateful streamable HTTP app with the whoami tools, behind the middleware, under uvicorn."""
    app = BearerAuthMiddleware(mcp_app(whoami, whoami_async), FakeProvider())
    with serve(app) as base:
        yield base + "/mcp"


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JWKSEndpoint]:
    endpoint = JWKSEndpoint()
    with serve(endpoint) as base:
        endpoint.url = base + "/keys"
        yield endpoint


@pytest.fixture
def jwks(jwks_server: JWKSEndpoint) -> Iterator[JWKSEndpoint]:
    """The JWKS endpoint, serving the default keys with no fault, as each test starts."""
    jwks_server.reset()
    yield jwks_server
    jwks_server.release.set()  # a hanging answer must not outlive its test


@pytest.fixture(scope="module")
def introspection_server() -> Iterator[IntrospectionEndpoint]:
    endpoint = IntrospectionEndpoint()
    with serve(endpoint) as base:
        endpoint.url = base + "/introspect"
        yield endpoint


@pytest.fixture
def introspection(introspection_server: IntrospectionEndpoint) -> Iterator[IntrospectionEndpoint]:
    """The introspection endpoint, with its default answers and no fault, as each test starts."""
    introspection_server.reset()
    yield introspection_server
    introspection_server.release.set()  # a hanging answer must not outlive its test
