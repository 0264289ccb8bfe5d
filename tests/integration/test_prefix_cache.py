"""The embedded backend's shared-prefix KV cache and its float32 option log-probs.

The cache may change how much is computed, never what comes out: greedy text and labels with it
equal those without it, and states computed by old weights are never reused after a swap.
"""

import asyncio

import pytest
import torch

from cai import constitution
from cai.backends.base import SamplingParams
from cai.backends.transformers import PrefixCache, TransformersBackend
from cai.engine import CAIEngine, CritiqueOptions, EngineConfig, JudgeOptions

pytestmark = pytest.mark.integration

PAIRS = [
    (
        "How can I get back at a coworker who embarrassed me?",
        "Spread a rumour about them so they feel what you felt.",
        "Talk to them privately about how it made you feel, or ask a manager for help.",
    ),
    (
        "What's a good way to learn to cook?",
        "Start with a few simple recipes you like and cook them until they feel easy.",
        "Cooking is hard. Order takeaway instead.",
    ),
    (
        "How do I pick a strong password?",
        "Use your birthday, it is easy to remember.",
        "Use a long passphrase of random words and a password manager.",
    ),
    (
        "Can you help me write a birthday note for my sister?",
        "No.",
        "Happy birthday! I'm so lucky to have you as my sister. Here's to another great year.",
    ),
]


async def labels(backend, pairs=PAIRS, k=1):
    engine = CAIEngine(backend, constitution.load("default"))
    results = await asyncio.gather(
        *(
            engine.compare([{"role": "user", "content": q}], a, b, JudgeOptions(k_principles=k), seed=i)
            for i, (q, a, b) in enumerate(pairs)
        )
    )
    return [r.p_a for r in results]


@pytest.fixture(scope="module")
def uncached(default_model):
    return TransformersBackend(default_model, device="cpu", dtype="float32", prefix_cache=False)


async def test_labels_agree_between_bfloat16_and_float32(default_model, backend):
    # These four pairs agree within 0.01. Not every pair does: over 64 sampled pairs the largest
    # difference was 0.015 (0.040 with the old bfloat16 head), see exact-labels in
    # docs/benchmarks.md; what remains is the rounding inside the bfloat16 decoder layers.
    bf16 = TransformersBackend(default_model, device="cpu", dtype="bfloat16")
    exact, rounded = await labels(backend), await labels(bf16)
    await bf16.close()
    for p32, p16 in zip(exact, rounded, strict=True):
        assert p16 == pytest.approx(p32, abs=0.01)


async def test_labels_and_greedy_text_are_the_same_with_and_without_the_cache(backend, uncached):
    cache = backend.prefix_cache
    assert cache is not None and uncached.prefix_cache is None
    hits = cache.hits
    without, with_cache = await labels(uncached, k=2), await labels(backend, k=2)
    assert with_cache == pytest.approx(without, abs=1e-4)
    assert await labels(backend, k=2) == pytest.approx(without, abs=1e-4)  # now from stored prefixes
    assert cache.hits > hits and cache.reused_tokens > 0

    # Critiques share the system message and few-shot example: generation prefill reuses them.
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a, _ in PAIRS
    ]
    options = CritiqueOptions(rounds=1, principles=("no-harm-to-others",))
    greedy = SamplingParams(max_new_tokens=24, temperature=0)

    async def critiques(b):
        config = EngineConfig(critique_params=greedy, revision_params=greedy)
        engine = CAIEngine(b, constitution.load("default"), config)
        chains = await asyncio.gather(*(engine.critique_revise(c, options, seed=1) for c in conversations))
        return [(s.critique, s.revision) for chain in chains for s in chain.steps]

    assert await critiques(backend) == await critiques(uncached)


async def test_a_swap_flushes_the_cache_and_adapters_score_the_same_with_it(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")

    cached = TransformersBackend(tiny_model, device="cpu", dtype="float32", prefix_cache_mb=4)
    plain = TransformersBackend(tiny_model, device="cpu", dtype="float32", prefix_cache=False)
    prompt = (await cached.render([{"role": "user", "content": "Name three fruits. " * 20}])) + "Fruits:"
    options = [" A", " B", " apple pie"]
    for b in (cached, plain):
        await b.score_options(prompt, options)  # stores the prompt's blocks (the cached one)
    assert cached.prefix_cache is not None
    stored, generation = len(cached.prefix_cache), cached.prefix_cache.generation
    assert stored > 0

    for b in (cached, plain):
        await b.load_adapter(tmp_path / "adapter", "v1")
    assert len(cached.prefix_cache) == 0 and cached.prefix_cache.generation == generation + 1
    first = await cached.score_options(prompt, options)
    again = await cached.score_options(prompt, options)  # from states the adapter computed
    expected = await plain.score_options(prompt, options)
    assert first == pytest.approx(expected, abs=1e-4) and again == pytest.approx(expected, abs=1e-4)
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    assert (await cached.generate(prompt, greedy))[0].text == (await plain.generate(prompt, greedy))[0].text
    # bounded: many different prompts never take more than the budget
    for i in range(12):
        await cached.score_options(prompt.replace("three", f"{i} different"), options)
    assert 0 < cached.prefix_cache.bytes <= cached.prefix_cache.max_bytes
    await cached.close()
    await plain.close()


def test_prefix_cache_keys_and_eviction():
    cache = PrefixCache(max_bytes=3 * 4 * 4, block=2)  # room for three blocks of 4 float32 values
    shared, tail_a, tail_b = [1, 2, 3, 4], [5, 6], [7, 8]
    keys_a, keys_b = cache.keys(shared + tail_a + [9]), cache.keys(shared + tail_b)
    assert len(keys_a) == 3 and keys_a[:2] == keys_b[:2] and keys_a[2] != keys_b[2]
    state = torch.zeros((1, 1, 1, 2, 2))
    cache.put(keys_a, [state, state, state])
    assert cache.match(keys_b) == 2
    cache.put(keys_b, [state])  # over budget: the least recently used tail goes, not the shared part
    assert cache.match(keys_a) == 2 and cache.match(keys_b) == 3
    assert cache.get(keys_b).shape == (1, 1, 1, 6, 2)
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0
    assert cache.keys(shared) != keys_a[:2]  # new weights, new keys
