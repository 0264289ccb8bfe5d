"""The openai backend keeping policy versions as LoRA adapters on vLLM.

vLLM cannot run here (no GPU), so `benchmarks.vllm_standin.VLLMStandIn` stands in for it: a small
HTTP server that follows vLLM's documented adapter routes, status codes and error bodies, and
answers with text naming the model that served it. These tests check our side: which adapter each
request names, which version its completions carry, and what is loaded and unloaded when.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from benchmarks.vllm_standin import VLLMStandIn
from cai.backends.base import SamplingParams
from cai.backends.openai import OpenAIBackend
from cai.errors import NotFound, Unavailable

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


def adapter(root: Path, version: str) -> Path:
    """An adapter folder as the policy service unpacks it (the stand-in reads only its config)."""
    folder = root / version
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights of " + version.encode())
    return folder


@pytest.fixture
def vllm():
    with VLLMStandIn() as server:
        yield server


async def test_each_version_is_an_adapter_and_completions_carry_the_one_that_served(vllm, tmp_path):
    backend = OpenAIBackend(vllm.url, keep_versions=2)
    await backend.start()
    assert backend.model_id == "base-model"
    (before,) = await backend.generate("Say hi.", GREEDY)
    assert before.policy_version == "base" and "(base-model)" in before.text
    for version in ("v1", "v2", "v3"):
        await backend.load_adapter(adapter(tmp_path, version), version)
        (completion,) = await backend.generate("Say hi.", GREEDY)
        assert completion.policy_version == version
        assert f"(policy-{version})" in completion.text  # the server did use that adapter
    # the two newest stay loaded; v1 went as soon as v3 came
    assert list(vllm.adapters) == ["policy-v2", "policy-v3"]
    assert vllm.unloads == ["policy-v1"]
    assert backend.policy_version == "v3"
    await backend.close()


async def test_a_version_still_running_is_unloaded_only_after_its_last_request(tmp_path):
    with VLLMStandIn(delay_s=1.0) as vllm:
        backend = OpenAIBackend(vllm.url, keep_versions=1)
        await backend.load_adapter(adapter(tmp_path, "v1"), "v1")
        running = asyncio.ensure_future(backend.generate("Long answer, please.", GREEDY))
        await asyncio.sleep(0.3)  # the request is on the server
        await backend.load_adapter(adapter(tmp_path, "v2"), "v2")
        assert "policy-v1" in vllm.adapters  # still serving the request started on it
        (completion,) = await running
        assert completion.policy_version == "v1" and "(policy-v1)" in completion.text
        assert list(vllm.adapters) == ["policy-v2"] and vllm.unloads == ["policy-v1"]
        await backend.close()


async def test_a_failed_load_keeps_the_old_version_serving(vllm, tmp_path):
    backend = OpenAIBackend(vllm.url, keep_versions=2)
    await backend.load_adapter(adapter(tmp_path, "v1"), "v1")
    vllm.fail_next_loads(1)
    with pytest.raises(Unavailable, match=r"HTTP 500.*policy-v2"):
        await backend.load_adapter(adapter(tmp_path, "v2"), "v2")
    (completion,) = await backend.generate("Say hi.", GREEDY)
    assert backend.policy_version == "v1" and completion.policy_version == "v1"
    await backend.load_adapter(tmp_path / "v2", "v2")  # tried again: it loads
    assert (await backend.generate("Say hi.", GREEDY))[0].policy_version == "v2"
    await backend.close()


async def test_a_restarted_server_is_brought_back_to_the_kept_versions(vllm, tmp_path):
    backend = OpenAIBackend(vllm.url, keep_versions=2)
    for version in ("v1", "v2", "v3"):
        await backend.load_adapter(adapter(tmp_path, version), version)
    vllm.restart()
    assert vllm.adapters == {}
    # the health check re-loads them (oldest first) before the service reports SERVING again
    assert await backend.ready(5) is None
    assert list(vllm.adapters) == ["policy-v2", "policy-v3"]
    vllm.restart()
    # a request that meets a server without our adapter (restarted between two checks) syncs too
    (completion,) = await backend.generate("Say hi.", GREEDY)
    assert completion.policy_version == "v3" and "(policy-v3)" in completion.text
    assert list(vllm.adapters) == ["policy-v2", "policy-v3"]
    await backend.close()


async def test_a_republished_version_with_other_weights_replaces_the_loaded_one(vllm, tmp_path):
    backend = OpenAIBackend(vllm.url, keep_versions=2)
    await backend.load_adapter(adapter(tmp_path / "first", "v1"), "v1")
    await backend.load_adapter(adapter(tmp_path / "again", "v1"), "v1")  # a trainer that resumed
    assert vllm.adapters == {"policy-v1": str(tmp_path / "again" / "v1")}
    await backend.close()


async def test_the_feedback_model_is_the_base_model_never_an_adapter(vllm, tmp_path):
    policy = OpenAIBackend(vllm.url, keep_versions=2)
    await policy.load_adapter(adapter(tmp_path, "v1"), "v1")
    # critique and judge on the same engine: a backend of their own, with no versions
    feedback = OpenAIBackend(vllm.url)
    await feedback.start()
    assert feedback.model_id == "base-model"
    (critique,) = await feedback.generate("Critique this.", GREEDY)
    assert critique.policy_version == "base" and "(base-model)" in critique.text
    assert len(await feedback.score_options("Which is better?", [" (A)", " (B)"])) == 2
    assert vllm.served[-1] == "base-model"
    # named explicitly: the server's model list is not asked which one
    named = OpenAIBackend(vllm.url, model="base-model")
    assert (await named.generate("Hi.", GREEDY))[0].policy_version == "base"
    # feedback through the policy service (base_weights): its own backend, naming the base model
    base = policy.base_weights()
    (answer,) = await base.generate("Critique this.", GREEDY)
    assert (answer.policy_version, base.policy_version) == ("base", "base") and "(base-model)" in answer.text
    await base.score_options("Which is better?", [" (A)", " (B)"])
    assert vllm.served[-1] == "base-model"
    (served,) = await policy.generate("Hi.", GREEDY)
    assert served.policy_version == policy.policy_version == "v1"
    for backend in (policy, feedback, named):
        await backend.close()


async def test_a_server_without_runtime_lora_updating_is_named_in_the_error(tmp_path):
    with VLLMStandIn(runtime_lora_updating=False) as vllm:
        backend = OpenAIBackend(vllm.url)
        with pytest.raises(NotFound, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
            await backend.load_adapter(adapter(tmp_path, "v1"), "v1")
        assert backend.policy_version == "base"
        await backend.close()
