"""The embedded transformers backend on the real default model."""

import asyncio
from pathlib import Path

import pytest
import torch

from cai.backends.base import SamplingParams, plain_chat
from cai.backends.transformers import TransformersBackend
from cai.errors import InvalidArgument, NotFound, ResourceExhausted

pytestmark = pytest.mark.integration
CHAT = [{"role": "user", "content": "Name three fruits."}]


async def test_generate_is_seeded_and_reports_tokens(backend):
    prompt = await backend.render(CHAT)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=11, n=2)
    first = await backend.generate(prompt, params)
    again = await backend.generate(prompt, params)
    assert [c.text for c in first] == [c.text for c in again]
    assert len(first) == 2 and first[0].text != first[1].text
    for c in first:
        assert c.text.strip()
        assert 1 <= c.tokens <= 12
        assert c.finish_reason in ("stop", "length")
        assert c.policy_version == backend.policy_version


async def test_concurrent_requests_share_batches_and_keep_their_own_parameters(backend):
    prompt = await backend.render(CHAT)
    sizes: list[int] = []
    backend.on_batch = sizes.append
    try:
        short, long_ = await asyncio.gather(
            backend.generate(prompt, SamplingParams(max_new_tokens=3, temperature=0)),
            backend.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0)),
        )
    finally:
        backend.on_batch = None
    assert short[0].tokens == 3 and short[0].finish_reason == "length"
    assert long_[0].tokens > 3
    assert max(sizes) == 2  # one batch held both requests
    # the batched greedy answer equals the same request run alone
    [alone] = await backend.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0))
    assert alone.text == long_[0].text


async def test_stop_strings_and_streaming(backend):
    prompt = await backend.render([{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    [full] = await backend.generate(prompt, SamplingParams(max_new_tokens=30, temperature=0))
    assert "4" in full.text
    cut = full.text.index("4")
    [stopped] = await backend.generate(prompt, SamplingParams(max_new_tokens=30, temperature=0, stop=("4",)))
    assert stopped.text == full.text[:cut] and stopped.finish_reason == "stop"
    pieces = [
        p async for p in backend.generate_stream(prompt, SamplingParams(max_new_tokens=30, temperature=0))
    ]
    assert len(pieces) > 3
    assert "".join(pieces) == full.text


@pytest.mark.parametrize(
    "options",
    [[" apple, banana, cherry", " car", " A"], [" A", " B"]],  # one sequence per option / per prompt
)
async def test_score_options_equals_the_log_probs_of_a_plain_forward_pass(backend, options):
    prompt = (await backend.render(CHAT)) + "Here are three fruits:"
    scores = await backend.score_options(prompt, options)
    model, tok = backend.model, backend.tokenizer
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    for option, score in zip(options, scores, strict=True):
        o_ids = tok(option, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = model(torch.tensor([p_ids + o_ids])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        expected = sum(float(logp[len(p_ids) - 1 + i, t]) for i, t in enumerate(o_ids))
        assert score == pytest.approx(expected, abs=1e-3)


async def test_full_queue_pushes_back(default_model):
    small = TransformersBackend(default_model, device="cpu", dtype="float32", max_queue=2)
    prompt = await small.render(CHAT)
    results = await asyncio.gather(
        *(small.generate(prompt, SamplingParams(max_new_tokens=2)) for _ in range(4)),
        return_exceptions=True,
    )
    assert any(isinstance(r, ResourceExhausted) for r in results)
    assert any(isinstance(r, list) for r in results)
    await small.close()


async def test_cancelled_request_leaves_the_batch(backend):
    prompt = await backend.render(CHAT)
    task = asyncio.ensure_future(backend.generate(prompt, SamplingParams(max_new_tokens=200, temperature=0)))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the backend keeps serving
    [after] = await backend.generate(prompt, SamplingParams(max_new_tokens=3, temperature=0))
    assert after.tokens == 3


async def test_swap_changes_weights_between_batches(default_model):
    b = TransformersBackend(default_model, device="cpu", dtype="float32")
    prompt = await b.render(CHAT)
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    [before] = await b.generate(prompt, greedy)

    def zero_lm_head(model):
        with torch.no_grad():
            model.lm_head.weight.mul_(0.0)  # tied to the embeddings, so every logit becomes 0

    await b.swap(zero_lm_head, "v1")
    [after] = await b.generate(prompt, greedy)
    assert after.policy_version == "v1" and before.policy_version == "base"
    assert after.text != before.text
    await b.close()


def test_bad_parameters_and_missing_model(tmp_path):
    with pytest.raises(InvalidArgument, match="top_p"):
        SamplingParams(top_p=0).validate()
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0).validate()
    with pytest.raises(NotFound, match="cannot load"):
        TransformersBackend(str(tmp_path / "no-such-model"))


async def test_requests_cancelled_while_queued_free_their_queue_places(default_model):
    b = TransformersBackend(default_model, device="cpu", dtype="float32", max_queue=2)
    prompt = await b.render(CHAT)
    busy = asyncio.ensure_future(b.generate(prompt, SamplingParams(max_new_tokens=40)))
    await asyncio.sleep(0.3)  # the worker is now decoding `busy`
    waiting = [asyncio.ensure_future(b.generate(prompt, SamplingParams(max_new_tokens=2))) for _ in range(2)]
    await asyncio.sleep(0)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    # the two cancelled requests must not keep holding the queue's two places
    results = await asyncio.gather(*(b.generate(prompt, SamplingParams(max_new_tokens=2)) for _ in range(2)))
    assert all(r[0].tokens >= 1 for r in results)
    await busy
    await b.close()


async def test_a_model_without_chat_template_gets_the_plain_transcript(default_model, tmp_path):
    base = tmp_path / "base-model"
    base.mkdir()
    for item in Path(default_model).iterdir():
        if item.name != "chat_template.jinja":  # as a base model ships: no chat template
            (base / item.name).symlink_to(item)
    b = TransformersBackend(str(base), device="cpu", dtype="float32")
    messages = [{"role": "user", "content": "Name a colour."}]
    assert await b.render(messages) == plain_chat(messages) == "User: Name a colour.\n\nAssistant:"
    [completion] = await b.generate(await b.render(messages), SamplingParams(max_new_tokens=4, temperature=0))
    assert completion.tokens >= 1
    await b.close()
