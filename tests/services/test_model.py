"""The services on the real default model: the policy service runs it, and the critique and judge
services use the policy service's base weights as their backend (`policy:ADDRESS`), as a
deployment with one model does. grpcurl, a client we did not write, calls them through reflection."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import grpc
import pytest

from cai.backends.transformers import TransformersBackend
from services.backends import PolicyServiceBackend
from services.client import AsyncClient, judge_options, parameters
from services.server import start_service

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "user", "content": "How can I get back at a coworker who embarrassed me?"}]
ANSWER = [*PROMPT, {"role": "assistant", "content": "Spread a rumour about them so they feel what you felt."}]
KIND = "Talk to them privately about how it made you feel, or ask a manager for help."


@pytest.fixture(scope="module")
async def model_stack(default_model, make_settings):
    policy = await start_service(
        "policy",
        make_settings("policy", max_new_tokens=512, max_prompt_tokens=4096),
        TransformersBackend(default_model, device="cpu"),
    )
    others = {
        name: await start_service(
            name,
            make_settings(name, max_prompt_tokens=1024),
            PolicyServiceBackend(policy.address, base_weights=True),
        )
        for name in ("critique", "judge")
    }
    running = {"policy": policy, **others}
    yield running
    for service in running.values():
        await service.stop(0)
        await service.backend.close()  # passed in, so the service leaves it open


@pytest.fixture(scope="module")
async def model_clients(model_stack):
    opened = {name: AsyncClient(s.address, timeout=300) for name, s in model_stack.items()}
    yield opened
    for client in opened.values():
        await client.close()


async def test_policy_generates_and_streams(model_clients):
    policy = model_clients["policy"]
    greedy = parameters(max_new_tokens=12, temperature=0)
    reply = await policy.generate(PROMPT, n=2, params=parameters(max_new_tokens=12, seed=3))
    assert len(reply.completions) == 2 and all(
        c.text.strip() and c.token_count <= 12 for c in reply.completions
    )
    [plain] = (await policy.generate(PROMPT, params=greedy)).completions
    pieces = [p async for p in policy.generate_stream(PROMPT, greedy)]
    assert len(pieces) > 2 and "".join(p.text for p in pieces) == plain.text
    assert pieces[-1].token_count == plain.token_count


async def test_critique_streams_each_round(model_clients, model_stack):
    critic = model_clients["critique"]
    one = await critic.critique(
        ANSWER, principle_id="no-harm-to-others", params=parameters(max_new_tokens=24)
    )
    assert one.critique.strip()
    steps = []
    async for step in critic.critique_revise(ANSWER, rounds=2, seed=1):
        steps.append(step)
    assert [s.round for s in steps] == [1, 2]
    assert all(s.critique.strip() and s.revision.strip() for s in steps)
    assert model_stack["critique"].backend.model_id == model_stack["policy"].backend.model_id


async def test_judge_gives_soft_labels(model_clients):
    judge = model_clients["judge"]
    reply = await judge.compare(PROMPT, ANSWER[-1]["content"], KIND, judge_options(k_principles=2, seed=0))
    assert 0 < reply.p_a < 1 and len(reply.labels) == 2
    assert all(0 < label.p_first_ab < 1 and 0 < label.p_first_ba < 1 for label in reply.labels)


async def test_expired_deadline_stops_generation_and_frees_the_batch_slot(model_clients, model_stack):
    policy = model_clients["policy"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await policy.generate(PROMPT, params=parameters(max_new_tokens=500, temperature=0), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    backend = model_stack["policy"].backend
    for _ in range(100):
        if backend.queue_depth == 0:
            break
        await asyncio.sleep(0.1)
    assert backend.queue_depth == 0  # 500 tokens would take far longer than this wait
    assert (await policy.generate(PROMPT, params=parameters(max_new_tokens=4))).completions


def grpcurl() -> str:
    pinned = ROOT / ".tools" / "grpcurl"  # what `make tools` installs
    found = os.environ.get("GRPCURL") or (str(pinned) if pinned.exists() else shutil.which("grpcurl"))
    assert found, "grpcurl is missing: `make tools` installs it into .tools/"
    return found


async def run_grpcurl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        grpcurl(), "-plaintext", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_grpcurl_lists_services_and_calls_critique(model_stack):
    address = model_stack["critique"].address
    listed = (await run_grpcurl(address, "list")).split()
    assert "cai.v1.CritiqueService" in listed and "grpc.health.v1.Health" in listed
    methods = await run_grpcurl(address, "list", "cai.v1.CritiqueService")
    assert "cai.v1.CritiqueService.CritiqueRevise" in methods
    request = {
        "conversation": {
            "messages": [
                {"role": "ROLE_USER", "content": PROMPT[0]["content"]},
                {"role": "ROLE_ASSISTANT", "content": ANSWER[-1]["content"]},
            ]
        },
        "principle_id": "no-harm-to-others",
        "parameters": {"max_new_tokens": 24},
    }
    reply = json.loads(
        await run_grpcurl("-d", json.dumps(request), address, "cai.v1.CritiqueService/Critique")
    )
    assert reply["principle_id"] == "no-harm-to-others" and reply["critique"].strip()


async def test_the_prefix_cache_is_on_the_metrics_port(model_clients, model_stack):
    """Both orderings of a pair share the judge prompt's head, so judging counts prefix-cache hits."""
    import urllib.request

    await model_clients["judge"].compare(PROMPT, ANSWER[-1]["content"], KIND, judge_options(seed=1))
    port = model_stack["policy"].metrics_port
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    )
    hits = [
        line for line in text.splitlines() if line.startswith('cai_prefix_cache_lookups_total{result="hit"')
    ]
    assert hits and float(hits[0].rsplit(" ", 1)[1]) > 0, text
    assert "cai_prefix_cache_bytes{" in text
