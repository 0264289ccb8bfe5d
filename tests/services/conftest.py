"""Servers on loopback. Protocol tests run them on the deterministic FakeBackend (no model), so
they check the gRPC layer only; behaviour tests (test_model.py) use the real default model."""

from __future__ import annotations

from typing import Any

import pytest

from cai.backends.fake import FakeBackend
from services.client import AsyncClient
from services.server import start_service
from services.settings import ServiceSettings, load_settings

LIMITS = {"max_prompt_tokens": 200, "max_new_tokens": 64, "max_n": 4, "max_rounds": 3, "max_batch": 8}


def settings(name: str, **extra: Any) -> ServiceSettings:
    values = {"port": 0, "metrics_port": 0, "grace_s": 5, **LIMITS, **extra}
    return load_settings(name, None, **values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def make_settings():
    """Settings on free loopback ports with small limits, so tests can cross them cheaply."""
    return settings


@pytest.fixture(scope="session")
async def fake_stack():
    """The three services on FakeBackends; yields {name: RunningService}."""
    running = {
        name: await start_service(name, settings(name), FakeBackend())
        for name in ("policy", "critique", "judge")
    }
    yield running
    for service in running.values():
        await service.stop(0)


@pytest.fixture
async def clients(fake_stack):
    opened = {name: AsyncClient(s.address, timeout=10, retries=0) for name, s in fake_stack.items()}
    yield opened
    for client in opened.values():
        await client.close()
