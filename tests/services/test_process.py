"""`cai serve` as a real process (SIGTERM, JSON logs, settings from the environment) and the
client commands `cai generate|critique|compare` against running services."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import AsyncClient, parameters

CAI = [sys.executable, "-m", "cli.main"]
COUNT = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def cai(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CAI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.integration
@pytest.mark.slow
async def test_sigterm_lets_the_call_in_flight_finish_refuses_new_ones_and_exits_0(
    default_model, tmp_path: Path
):
    port = free_port()
    # Settings from the environment, as a Deployment sets them.
    env = {
        **os.environ,
        "CAI_POLICY_PORT": str(port),
        "CAI_POLICY_METRICS_PORT": "0",
        "CAI_POLICY_GRACE_S": "600",  # a loaded CPU can take minutes for the long call
        "CAI_POLICY_DRAIN_S": "0",  # no drain: new calls are refused at once (the drain has its own test)
    }
    log = (tmp_path / "policy.log").open("w+")
    server = await asyncio.create_subprocess_exec(
        *CAI,
        "serve",
        "policy",
        "--backend",
        f"transformers:{default_model}",
        "--dtype",
        "float32",
        env=env,
        stderr=log,
    )
    address = f"127.0.0.1:{port}"
    try:
        async with AsyncClient(address, timeout=300, retries=0) as client:
            await client.wait_ready(timeout=120)
            health = health_pb2_grpc.HealthStub(client.channel)
            assert (
                await health.Check(health_pb2.HealthCheckRequest())
            ).status == health_pb2.HealthCheckResponse.SERVING
            long_call = asyncio.ensure_future(
                client.generate(COUNT, params=parameters(max_new_tokens=200, temperature=0))
            )
            await asyncio.sleep(2.0)  # the call is decoding now: 200 tokens take far longer on CPU
            assert not long_call.done()
            server.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            async with AsyncClient(address, timeout=5, retries=0) as late:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await late.generate(COUNT, params=parameters(max_new_tokens=4))
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            reply = await long_call
            assert reply.completions[0].token_count > 50
        assert await asyncio.wait_for(server.wait(), 60) == 0
    finally:
        if server.returncode is None:
            server.kill()
    log.seek(0)
    entries = [json.loads(line) for line in log if line.startswith("{")]
    messages = [e["msg"] for e in entries]
    assert "serving" in messages and "shutting down" in messages and messages[-1] == "stopped"
    assert any(e.get("method") == "/cai.v1.PolicyService/Generate" and e.get("code") == "OK" for e in entries)


async def test_client_commands(fake_stack):
    address = {name: service.address for name, service in fake_stack.items()}
    code, out, err = await cai(
        "generate", "Hello", "-n", "2", "--seed", "1", "--address", address["policy"], "--json"
    )
    assert code == 0, err
    reply = json.loads(out)
    assert len(reply["completions"]) == 2 and reply["model_id"] == "fake"

    code, out, err = await cai("generate", "Hello", "--stream", "--address", address["policy"])
    assert code == 0 and out.strip(), err

    code, out, err = await cai(
        "critique",
        "How do I boil an egg?",
        "Eight minutes.",
        "--rounds",
        "2",
        "--address",
        address["critique"],
        "--json",
    )
    assert code == 0, err
    steps = [json.loads(line) for line in out.splitlines()]
    assert [s["round"] for s in steps] == [1, 2] and all(s["critique"] for s in steps)

    code, out, err = await cai(
        "compare", "Hi", "Hello!", "Go away.", "-k", "2", "--address", address["judge"]
    )
    assert code == 0, err
    assert "p(A better) =" in out

    code, out, err = await cai(
        "critique", "Hi", "Hello", "--principle", "no-such-id", "--address", address["critique"]
    )
    assert code == 1 and "NOT_FOUND" in err and "no-such-id" in err and "Traceback" not in err

    code, out, err = await cai(
        "compare", "Hi", "a", "b", "--address", f"127.0.0.1:{free_port()}", "--timeout", "2"
    )
    assert code == 1 and ("UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err) and "Traceback" not in err


async def test_serve_rejects_bad_settings_by_name(tmp_path: Path):
    code, _, err = await cai("serve", "judge", "--max-n", "0")
    assert code == 2 and "max_n" in err
    config = tmp_path / "judge.yaml"
    config.write_text("max_rounds: 2\nbogus_setting: 1\n")
    code, _, err = await cai("serve", "judge", "--config", str(config))
    assert code == 2 and "bogus_setting" in err
    code, _, err = await cai("serve", "judge", "--backend", "nonsense")
    assert code == 2 and "backend" in err
