"""The step's log-probs on a tiny random model: the chunked LM head over completion positions
gives the sums and gradients of the full-logits computation (LoRA and full fine-tuning), the
reference pass runs without gradients on the base weights, and each sample is tokenized once."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import pytest
import torch

import trainer.train as train_module
from cai.errors import InvalidArgument
from cai.records import TrainingSample
from trainer.config import TrainConfig
from trainer.data import Encoded, collate, encode
from trainer.io import build_trainer
from trainer.loss import IGNORE, completion_logps, sequence_logps
from trainer.streams import MemorySource
from trainer.train import Trainer

pytestmark = pytest.mark.integration  # the default model's tokenizer and chat template


def make_trainer(model: str, out: Path, lora: bool) -> Trainer:
    config = TrainConfig.from_dict(
        {
            "model": model,
            "mode": "dpo",
            "source": "memory",
            "output_dir": str(out),
            "device": "cpu",
            "dtype": "float32",
            "max_steps": 1,
            "lora": lora,
            "lora_dropout": 0.0,  # the same function in both computations compared below
            "lora_target_modules": ["q_proj", "v_proj"],
        }
    )
    trainer = Trainer(config, MemorySource(queue.Queue(), lambda: True))
    if lora:  # LoRA starts as the identity (B = 0): give the adapter an effect
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return trainer


def items(tokenizer: Any) -> list[Encoded]:
    """Three sequences with prompts and completions of different lengths, so rows pad."""
    chats = [
        ("Say hi.", "Hi there! How can I help you today?"),
        ("A much longer question, with many more words in it than the others, about colours?", "Blue."),
        ("What is 2+2?", "It is 4, since two and two make four."),
    ]
    out = [
        encode(tokenizer, [{"role": "user", "content": q}], [{"role": "assistant", "content": a}], 256)
        for q, a in chats
    ]
    assert len({e.prompt_len for e in out}) == 3 and len({len(e.ids) for e in out}) == 3
    return out


def full_logps(model: Any, batch_items: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward computation: the logits of every position, then log-softmax."""
    batch = collate(batch_items, pad_id)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return sequence_logps(logits, batch.labels)


def gradients(trainer: Trainer, logps: torch.Tensor) -> dict[str, torch.Tensor]:
    weights = torch.tensor([1.0, -2.0, 0.5])  # as a loss mixes the sequences with signs
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return grads


def test_chunked_head_on_random_tensors_equals_full_logits():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 9, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[0, :4] = IGNORE
    labels[1, :2] = IGNORE
    labels[1, 7:] = IGNORE  # padding
    labels[2, :8] = IGNORE  # one completion token
    scale = torch.tensor([1.0, 2.0, -3.0])
    expected, expected_counts = sequence_logps(torch.nn.functional.linear(hidden, weight, bias), labels)
    (expected * scale).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    for chunk in (1, 2, 4, 100):
        logps, counts = completion_logps(hidden, labels, weight, bias, chunk=chunk)
        (logps * scale).sum().backward()
        assert torch.equal(counts, expected_counts)
        torch.testing.assert_close(logps, expected)
        torch.testing.assert_close((hidden.grad, weight.grad), grads)
        hidden.grad = weight.grad = None


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_step_logps_and_gradients_equal_the_full_logits_computation(tiny_model, tmp_path, lora):
    trainer = make_trainer(tiny_model, tmp_path / "out", lora)
    trainer.logp_chunk = 5  # several chunks, the last one partial
    batch_items = items(trainer.tokenizer)
    fast, counts = trainer._logps(trainer.model, batch_items)
    assert fast.requires_grad  # the policy pass trains
    fast_grads = gradients(trainer, fast)
    expected, expected_counts = full_logps(trainer.model, batch_items, trainer.pad_id)
    expected_grads = gradients(trainer, expected)
    assert torch.equal(counts, expected_counts) and int(counts.sum()) > 3 * trainer.logp_chunk
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == expected_grads.keys()
    trained = [n for n in fast_grads if "lora_" in n] if lora else list(fast_grads)
    assert trained and all(fast_grads[n].abs().max() > 0 for n in trained)
    if not lora:  # full fine-tuning trains the (tied) LM head through the chunks too
        assert any("embed_tokens" in n or "lm_head" in n for n in fast_grads)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], expected_grads[name], rtol=1e-4, atol=1e-6)
    trainer.close()


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_reference_pass_is_the_base_model_without_gradients(tiny_model, tmp_path, lora):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tiny_model, tmp_path / "out", lora)
    if not lora:  # as after some training: the policy's weights moved, the reference's did not
        with torch.no_grad():
            for param in trainer.model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
        assert trainer.reference is not None
        assert not any(p.requires_grad for p in trainer.reference.parameters())
    batch_items = items(trainer.tokenizer)
    seen: list[tuple[bool, bool]] = []

    def record(module: Any, args: Any) -> None:  # gradients on? the adapter on?
        adapters = [m for name, m in trainer.model.named_modules() if name.endswith("q_proj")]
        seen.append((torch.is_grad_enabled(), lora and not adapters[0].disable_adapters))

    decoder = (trainer.reference or trainer.model.get_base_model()).get_decoder()
    handle = decoder.register_forward_pre_hook(record)
    reference = trainer._reference_logps(batch_items)
    handle.remove()
    assert seen == [(False, False)] and not reference.requires_grad

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        expected, _ = full_logps(base, batch_items, trainer.pad_id)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    # and the policy pass after it is the policy again (adapter back on, or the trained copy)
    policy, _ = trainer._logps(trainer.model, batch_items)
    assert (policy.detach() - expected).abs().max() > 1e-3
    trainer.close()


def test_each_sample_is_tokenized_once_per_run(tiny_model, run_dir, tmp_path, monkeypatch):
    calls: list[str] = []

    def counting_encode(tokenizer: Any, prompt: Any, completion: Any, max_length: int) -> Encoded:
        calls.append(prompt[-1]["content"])
        return encode(tokenizer, prompt, completion, max_length)

    monkeypatch.setattr(train_module, "encode", counting_encode)
    config = TrainConfig.from_dict(
        {
            "model": tiny_model,
            "mode": "dpo",
            "data": str(run_dir),
            "output_dir": str(tmp_path / "out"),
            "device": "cpu",
            "dtype": "float32",
            "micro_batch_size": 2,
            "max_steps": 5,  # 10 pairs: the five of the run folder, twice
            "lora_target_modules": ["q_proj", "v_proj"],
        }
    )
    trainer = build_trainer(config)
    result = trainer.train()
    trainer.close()
    assert result.samples == 10 and trainer.source.epoch >= 1  # every pair came round again
    assert len(calls) == 5 * 2  # each pair's two completions, in the first epoch only


class WordTokenizer:
    """A tokenizer without a chat template or end-of-sequence token: one id per word."""

    chat_template = None
    eos_token = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [len(word) for word in text.split()]}


def test_a_sample_that_cannot_be_tokenized_is_named(tiny_model, tmp_path):
    empty = [{"role": "assistant", "content": ""}]
    with pytest.raises(InvalidArgument, match="completion: it renders to no tokens"):
        encode(WordTokenizer(), [{"role": "user", "content": "Hi?"}], empty, 16)
    feed: queue.Queue[TrainingSample | None] = queue.Queue()
    prompt = [{"role": "user", "content": "Hi?"}]
    pair = (empty, [{"role": "assistant", "content": "No"}])
    feed.put(TrainingSample("s7", "topic[0]@7", prompt, pair, 1.0))
    feed.put(None)  # the end of the stream: the step is taken with the one sample there is
    trainer = make_trainer(tiny_model, tmp_path / "out", lora=True)
    trainer.source = MemorySource(feed, lambda: False)
    trainer.tokenizer = WordTokenizer()
    with pytest.raises(InvalidArgument, match=r"^topic\[0\]@7: sample s7: completion: it renders to no"):
        trainer.train()
    trainer.close()
