"""Bounded state in the services: calls served at once have a limit; what is over it is refused
with RESOURCE_EXHAUSTED, and the in-flight gauge returns to zero."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cai.backends.fake import FakeBackend
from services.client import AsyncClient
from services.server import start_service
from tests.reliability.support import settings, until

CHAT = [{"role": "user", "content": "Hello"}]


def in_flight(service) -> float:
    value = service.metrics.registry.get_sample_value("cai_in_flight_requests", {"service": service.name})
    return float(value or 0)


async def test_calls_over_max_concurrent_rpcs_are_refused_and_the_rest_answered():
    service = await start_service("policy", settings("policy", max_concurrent_rpcs=2), FakeBackend(delay_s=2))
    try:
        async with AsyncClient(service.address, timeout=30, retries=0) as client:
            await client.wait_ready(10)
            slow = [asyncio.ensure_future(client.generate(CHAT)) for _ in range(2)]
            await until(lambda: in_flight(service) == 2, "both slow calls to be in flight")
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await client.generate(CHAT)
            assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert all(reply.completions for reply in await asyncio.gather(*slow))
            assert (await client.generate(CHAT)).completions  # room again
        assert in_flight(service) == 0
    finally:
        await service.stop(0)
