"""Health tells the truth: readiness follows the backend, liveness the process; SIGTERM drains.

Real gRPC servers on loopback; the policy service runs on a FakeBackend (the model plays no part
in health). The drain test runs `cai serve` as a process and sends it SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from cai.backends.fake import FakeBackend
from services.client import AsyncClient
from services.server import SERVICE_NAMES, start_service
from tests.reliability.support import (
    NOT_SERVING,
    SERVING,
    free_port,
    policy_settings,
    settings,
    status,
    wait_status,
)

ANSWERED = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]


async def critique_call(address: str) -> str:
    async with AsyncClient(address, timeout=10, retries=0) as client:
        return (await client.critique(ANSWERED)).critique


@pytest.mark.parametrize("front", ["critique", "judge"])
async def test_critique_and_judge_are_not_ready_while_their_policy_service_is_down(front):
    port = free_port()
    policy = await start_service("policy", policy_settings(port=port), FakeBackend())
    service = await start_service(front, settings(front, backend=f"policy:127.0.0.1:{port}"))
    name = SERVICE_NAMES[front]
    try:
        assert await status(service.address, name) == SERVING
        await policy.stop(0)
        await wait_status(service.address, name, NOT_SERVING)
        assert await status(service.address) == SERVING  # liveness: the process is fine
        async with AsyncClient(service.address, timeout=10, retries=0) as client:
            with pytest.raises(grpc.aio.AioRpcError) as down:
                if front == "critique":
                    await client.critique(ANSWERED)
                else:
                    await client.compare([{"role": "user", "content": "Hi"}], "Hello!", "Go away.")
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"127.0.0.1:{port}" in down.value.details()

        policy = await start_service("policy", policy_settings(port=port), FakeBackend())
        await wait_status(service.address, name, SERVING)
        async with AsyncClient(service.address, timeout=10, retries=0) as client:
            if front == "critique":
                assert (await client.critique(ANSWERED)).critique
            else:
                reply = await client.compare([{"role": "user", "content": "Hi"}], "Hello!", "Go away.")
                assert 0 <= reply.p_a <= 1
    finally:
        await service.stop(0)
        await policy.stop(0)


async def test_a_policy_service_that_is_not_ready_makes_its_critique_service_not_ready():
    policy = await start_service("policy", policy_settings(), FakeBackend())
    service = await start_service("critique", settings("critique", backend=f"policy:{policy.address}"))
    name = SERVICE_NAMES["critique"]
    try:
        await wait_status(service.address, name, SERVING)
        await policy.stop_serving()  # the policy service starts draining: still answering
        await wait_status(service.address, name, NOT_SERVING)
    finally:
        await service.stop(0)
        await policy.stop(0)


async def test_critique_starts_unready_when_its_policy_service_is_unreachable_and_recovers():
    port = free_port()
    service = await start_service("critique", settings("critique", backend=f"policy:127.0.0.1:{port}"))
    name = SERVICE_NAMES["critique"]
    policy = None
    try:
        assert await status(service.address, name) == NOT_SERVING
        assert await status(service.address) == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as early:
            await critique_call(service.address)
        assert early.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "backend has not started" in early.value.details()

        policy = await start_service("policy", policy_settings(port=port), FakeBackend())
        await wait_status(service.address, name, SERVING)
        assert await critique_call(service.address)
        assert service.backend.model_id == "fake"  # learnt from the policy service once it answered
    finally:
        await service.stop(0)
        if policy is not None:
            await policy.stop(0)


class _Engine(BaseHTTPRequestHandler):
    """An OpenAI-compatible server's model list: all the health check asks of it."""

    def do_GET(self) -> None:
        if self.path != "/v1/models":
            self.send_error(404)
            return
        body = json.dumps({"object": "list", "data": [{"id": "engine-model", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def engine(port: int) -> Iterator[None]:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Engine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


async def test_policy_service_is_ready_only_while_its_remote_engine_answers():
    port = free_port()
    service = await start_service("policy", settings("policy", backend=f"openai:http://127.0.0.1:{port}"))
    name = SERVICE_NAMES["policy"]
    try:
        assert await status(service.address, name) == NOT_SERVING  # no engine yet
        with engine(port):
            await wait_status(service.address, name, SERVING)
            assert service.backend.model_id == "engine-model"
        await wait_status(service.address, name, NOT_SERVING)
        assert await status(service.address) == SERVING
        with engine(port):
            await wait_status(service.address, name, SERVING)
    finally:
        await service.stop(0)


async def test_sigterm_drains_not_serving_while_still_answering_then_exits_0(tmp_path: Path):
    """`cai serve critique` on a slow policy service: after SIGTERM its health is NOT_SERVING at
    once, the call in flight and a new call are both answered during the drain, and the process
    exits 0 afterwards."""
    policy = await start_service("policy", policy_settings(), FakeBackend(delay_s=1.5))
    port = free_port()
    env = {
        **os.environ,
        "CAI_CRITIQUE_PORT": str(port),
        "CAI_CRITIQUE_METRICS_PORT": "0",
        "CAI_CRITIQUE_BACKEND": f"policy:{policy.address}",
        "CAI_CRITIQUE_DRAIN_S": "6",
        "CAI_CRITIQUE_GRACE_S": "10",
        "CAI_CRITIQUE_HEALTH_INTERVAL_S": "0.2",
    }
    log = (tmp_path / "critique.log").open("w+")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "serve", "critique", env=env, stderr=log
    )
    address = f"127.0.0.1:{port}"
    name = SERVICE_NAMES["critique"]
    try:
        async with AsyncClient(address, timeout=60, retries=0) as client:
            await client.wait_ready(timeout=60)
            await wait_status(address, name, SERVING)
            in_flight = asyncio.ensure_future(client.critique(ANSWERED))
            await asyncio.sleep(0.3)  # the call has reached the slow policy service
            process.send_signal(signal.SIGTERM)
            await wait_status(address, name, NOT_SERVING, timeout=5)
            assert await status(address) == NOT_SERVING  # the whole server drains too
            assert (await client.critique(ANSWERED)).critique  # new calls are still answered
            assert (await in_flight).critique
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await policy.stop(0)
    log.seek(0)
    entries = [json.loads(line) for line in log if line.startswith("{")]
    messages = [e["msg"] for e in entries]
    assert messages.index("serving") < messages.index("shutting down") < messages.index("stopped")
    [shutdown] = [e for e in entries if e["msg"] == "shutting down"]
    assert shutdown["drain_s"] == 6.0
    critiques = [e for e in entries if e.get("method") == "/cai.v1.CritiqueService/Critique"]
    assert [e["code"] for e in critiques] == ["OK", "OK"]
