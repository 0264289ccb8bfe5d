"""Critique and judge on the policy service (`policy:ADDRESS`) ask for its base weights, so the
feedback model stays fixed while the policy it judges follows the trainer. A policy service on
the tiny model with a random adapter loaded: what the feedback backend gets is what the model
gave before the adapter, and the policy's own callers (and `cai eval` of a running policy, the
same backend without `base_weights`) still get the adapter."""

from __future__ import annotations

import pytest
import torch

from cai.backends.base import SamplingParams
from cai.backends.transformers import TransformersBackend
from services.backends import PolicyServiceBackend
from services.client import AsyncClient, parameters
from services.server import start_service

pytestmark = pytest.mark.integration
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def random_adapter(model: str, folder) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model), lora).save_pretrained(folder)


async def test_the_feedback_backend_gets_the_base_weights_of_a_policy_that_moved_on(
    tiny_model, make_settings, tmp_path
):
    engine = TransformersBackend(tiny_model, device="cpu", dtype="float32")
    prompt = await engine.render([{"role": "user", "content": "Is it fine to borrow a neighbour's ladder?"}])
    [before] = await engine.generate(prompt, GREEDY)
    scores_before = await engine.score_options(prompt, [" Yes", " No"])
    random_adapter(tiny_model, tmp_path / "v1")
    await engine.load_adapter(tmp_path / "v1", "v1")

    policy = await start_service("policy", make_settings("policy"), engine)
    feedback = PolicyServiceBackend(policy.address, base_weights=True)
    evaluated = PolicyServiceBackend(policy.address)
    client = AsyncClient(policy.address, timeout=60)
    try:
        await feedback.start()
        await evaluated.start()
        [current] = await evaluated.generate(prompt, GREEDY)
        [text] = await feedback.generate(prompt, GREEDY)
        scores = await feedback.score_options(prompt, [" Yes", " No"])
        streamed = "".join([piece async for piece in feedback.generate_stream(prompt, GREEDY)])
        greedy = parameters(max_new_tokens=12, temperature=0)
        served = await client.generate(prompt, params=greedy, raw=True)
        info = await client.info()
    finally:
        await client.close()
        await feedback.close()
        await evaluated.close()
        await policy.stop(0)
        await engine.close()

    assert (text.policy_version, text.text) == ("base", before.text)
    assert streamed == before.text
    assert scores == pytest.approx(scores_before, abs=1e-5)
    assert feedback.policy_version == "base" and feedback.model_id == tiny_model
    # the policy's own callers get the adapter it serves
    assert info.policy_version == served.policy_version == "v1"
    assert served.completions[0].text != before.text
    assert (current.policy_version, current.text) == ("v1", served.completions[0].text)
    assert evaluated.policy_version == "v1"
