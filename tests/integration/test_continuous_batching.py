"""Continuous batching in the embedded backend: requests join a running batch at the next decode
step, scoring calls run between steps, and a new adapter serves new rows at once while running
rows finish on the version they started with. The tiny random model keeps the steps quick; what
it says does not matter, only that every row's greedy tokens are exactly those it gets alone."""

import asyncio

import pytest
import torch

from cai.backends.base import SamplingParams
from cai.backends.transformers import TransformersBackend

pytestmark = pytest.mark.integration
LONG = SamplingParams(max_new_tokens=160, temperature=0)
SHORT = SamplingParams(max_new_tokens=12, temperature=0)


def _backend(model: str, **options) -> TransformersBackend:
    return TransformersBackend(model, device="cpu", dtype="float32", batch_window_ms=1, **options)


async def _prompts(backend: TransformersBackend) -> tuple[str, str]:
    long_ = await backend.render([{"role": "user", "content": "Tell me a long story about the sea. " * 6}])
    short = await backend.render([{"role": "user", "content": "Hi."}])
    return long_, short


async def _started(backend: TransformersBackend, prompt: str, params: SamplingParams) -> asyncio.Task:
    """A generation task, returned once the backend has admitted it to its running batch."""
    loop = asyncio.get_running_loop()
    admitted = asyncio.Event()
    backend.on_batch = lambda rows: loop.call_soon_threadsafe(admitted.set)
    task = asyncio.ensure_future(backend.generate(prompt, params))
    await asyncio.wait_for(admitted.wait(), 60)
    backend.on_batch = None
    return task


@pytest.mark.parametrize("continuous", [True, False])
async def test_a_request_joins_the_running_batch_and_gets_its_own_tokens(tiny_model, continuous):
    backend = _backend(tiny_model, continuous_batching=continuous)
    long_prompt, short_prompt = await _prompts(backend)
    [long_alone] = await backend.generate(long_prompt, LONG)
    [short_alone] = await backend.generate(short_prompt, SHORT)

    finished: list[str] = []
    long_task = await _started(backend, long_prompt, LONG)
    long_task.add_done_callback(lambda _: finished.append("long"))
    [short] = await backend.generate(short_prompt, SHORT)
    finished.append("short")
    [long_] = await long_task
    await backend.close()

    # Joining a batch whose rows are longer and further along changes nothing in either answer.
    assert short.text == short_alone.text and long_.text == long_alone.text
    assert long_.tokens == LONG.max_new_tokens  # so the long one was still running when short came
    # Continuous: the short request ran alongside and finished first. Run to completion: it waited.
    assert finished == (["short", "long"] if continuous else ["long", "short"])


async def test_scores_run_between_decode_steps(tiny_model):
    backend = _backend(tiny_model)
    long_prompt, short_prompt = await _prompts(backend)
    long_task = await _started(backend, long_prompt, LONG)
    scores = await backend.score_options(short_prompt, [" A", " B"])
    assert not long_task.done()  # answered while the batch still decodes
    await long_task
    assert scores == pytest.approx(await backend.score_options(short_prompt, [" A", " B"]), abs=1e-5)
    await backend.close()


def _adapter(model: str, folder, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(folder)


async def test_a_new_adapter_serves_new_rows_at_the_next_step_and_running_rows_keep_theirs(
    tiny_model, tmp_path
):
    _adapter(tiny_model, tmp_path / "v1", seed=1)
    _adapter(tiny_model, tmp_path / "v2", seed=2)
    reference = _backend(tiny_model)  # each version alone, for the expected answers
    long_prompt, short_prompt = await _prompts(reference)
    expected = {}
    for version in ("base", "v1", "v2"):
        if version != "base":
            await reference.load_adapter(tmp_path / version, version)
        [long_alone] = await reference.generate(long_prompt, LONG)
        [short_alone] = await reference.generate(short_prompt, SHORT)
        expected[version] = (long_alone.text, short_alone.text)
    await reference.close()
    assert len({texts for texts in expected.values()}) == 3  # the adapters do change the answers

    backend = _backend(tiny_model)
    on_base = await _started(backend, long_prompt, LONG)
    await backend.load_adapter(tmp_path / "v1", "v1")
    assert not on_base.done()  # served without waiting for the running generation
    on_v1 = await _started(backend, long_prompt, LONG)
    [short_v1] = await backend.generate(short_prompt, SHORT)
    await backend.load_adapter(tmp_path / "v2", "v2")
    [short_v2] = await backend.generate(short_prompt, SHORT)  # three versions in one batch now
    [long_base], [long_v1] = await asyncio.gather(on_base, on_v1)

    assert (long_base.policy_version, long_base.text) == ("base", expected["base"][0])
    assert (long_v1.policy_version, long_v1.text) == ("v1", expected["v1"][0])
    assert (short_v1.policy_version, short_v1.text) == ("v1", expected["v1"][1])
    assert (short_v2.policy_version, short_v2.text) == ("v2", expected["v2"][1])
    # v1's adapter goes once its last row is done (the worker has passed that step once it
    # answers another request); v2's is the one left
    [again] = await backend.generate(short_prompt, SHORT)
    assert again.text == short_v2.text and list(backend.model.peft_config) == ["policy-2"]
    await backend.close()


async def test_base_weight_requests_run_beside_the_policy_rows_without_its_adapter(tiny_model, tmp_path):
    _adapter(tiny_model, tmp_path / "v1", seed=1)
    backend = _backend(tiny_model)
    long_prompt, short_prompt = await _prompts(backend)
    [short_base] = await backend.generate(short_prompt, SHORT)
    base_scores = await backend.score_options(long_prompt, [" A", " B"])
    await backend.load_adapter(tmp_path / "v1", "v1")
    feedback = backend.base_weights()  # what a critique or judge service on this engine gets
    assert (feedback.policy_version, backend.policy_version) == ("base", "v1")

    on_v1 = await _started(backend, long_prompt, LONG)
    # the policy's scores first: they store v1's prefix states, which the base rows must not reuse
    v1_scores = await backend.score_options(long_prompt, [" A", " B"])
    scores = await feedback.score_options(long_prompt, [" A", " B"])
    [short] = await feedback.generate(short_prompt, SHORT)
    streamed = "".join([piece async for piece in feedback.generate_stream(short_prompt, SHORT)])
    [short_v1] = await backend.generate(short_prompt, SHORT)
    assert not on_v1.done()  # the base rows were decoded in the policy's batch
    [long_v1] = await on_v1
    await backend.close()

    assert (short.policy_version, short.text) == ("base", short_base.text)
    assert streamed == short_base.text
    assert scores == pytest.approx(base_scores, abs=1e-5)
    assert short_v1.policy_version == long_v1.policy_version == "v1" and short_v1.text != short_base.text
    assert v1_scores != pytest.approx(base_scores, abs=1e-3)
