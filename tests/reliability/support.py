"""Helpers for the reliability tests: servers on loopback, health waits with deadlines."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.settings import ServiceSettings, load_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIMITS = {"max_prompt_tokens": 200, "max_new_tokens": 64, "max_n": 4, "max_rounds": 3, "max_batch": 8}


def settings(name: str, **extra: Any) -> ServiceSettings:
    """Free loopback ports, small limits, quick health checks."""
    values = {"port": 0, "metrics_port": 0, "grace_s": 5, "health_interval_s": 0.1, **LIMITS, **extra}
    return load_settings(name, None, **values)  # type: ignore[arg-type]


def policy_settings(**extra: Any) -> ServiceSettings:
    """A policy service roomy enough for the prompts critique and judge send it."""
    return settings("policy", max_prompt_tokens=8192, max_new_tokens=512, **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def status(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


async def wait_status(address: str, service: str, want: int, timeout: float = 30) -> None:
    """Watch `service`'s health at `address` until it is `want`; fail naming both after `timeout`."""
    seen: list[str] = []
    name = health_pb2.HealthCheckResponse.ServingStatus.Name
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            async for reply in stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout):
                seen.append(name(reply.status))
                if reply.status == want:
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
    raise AssertionError(
        f"health of {service or 'the server'} at {address} did not become {name(want)} "
        f"within {timeout} s (saw {seen})"
    )


async def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Wait until `condition()` holds; fail naming `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        await asyncio.sleep(0.05)
