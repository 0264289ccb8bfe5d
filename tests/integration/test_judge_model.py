"""A feedback model separate from the policy: `cai up --judge-model` and the critique and judge
services' `backend` setting, with a model of another family (Qwen2 layers, its own byte-level BPE
tokenizer and chat template) beside the default model (Llama layers, SmolLM2's tokenizer, ChatML).
The tiny model is random: what it says means nothing; which model said it is under test."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def other_family_model(tmp_path_factory) -> str:
    """A two-layer random Qwen2 model with a 600-token BPE tokenizer trained here on the
    constitution's text, and a chat template of its own."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("qwen2-tiny")
    corpus = (Path(__file__).parents[2] / "constitutions" / "default.yaml").read_text()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes
    )
    tokenizer.train_from_iterator([corpus], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return str(folder)


def test_the_two_models_differ_in_family_tokenizer_and_template(default_model, other_family_model):
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(default_model).model_type == "llama"
    assert AutoConfig.from_pretrained(other_family_model).model_type == "qwen2"
    ours, theirs = (
        AutoTokenizer.from_pretrained(default_model),
        AutoTokenizer.from_pretrained(other_family_model),
    )
    turn = [{"role": "user", "content": "Name a fruit."}]
    assert ours(" Name a fruit.")["input_ids"] != theirs(" Name a fruit.")["input_ids"]
    assert ours.apply_chat_template(turn, tokenize=False) != theirs.apply_chat_template(turn, tokenize=False)


def rows(out: Path, kind: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{kind}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("transport", [[], ["--services"]], ids=["in-process", "services"])
def test_up_critiques_and_judges_with_the_judge_model(default_model, other_family_model, tmp_path, transport):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "cli.main", "up", "--limit", "2", "--train-steps", "0"]
    command += ["--max-new-tokens", "12", "--judge-model", other_family_model, "--out", str(out), *transport]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"feedback model {other_family_model}" in " ".join(result.stdout.split())
    # the policy answered; the feedback model critiqued, revised and judged
    assert all(r["model_ids"] == [default_model, other_family_model] for r in rows(out, "revisions"))
    prefs = rows(out, "preferences")
    assert len(prefs) == 2
    assert all(p["model_ids"] == [default_model, other_family_model, other_family_model] for p in prefs)
    assert all(0 <= p["p_a"] <= 1 for p in prefs)
    run = json.loads((out / "run.json").read_text())
    assert run["model_id"] == default_model and run["signals"]["labels"] == 2
    stdout = " ".join(result.stdout.split())
    assert "label signal:" in stdout and "position consistency" in stdout
    # the summary warns exactly when run.json does
    assert ("warning: most labels carry no signal" in stdout) == bool(run["signals"]["warning"])


def test_up_judge_model_that_does_not_exist_is_one_clear_line(tmp_path):
    command = [sys.executable, "-m", "cli.main", "up", "--limit", "1", "--train-steps", "0"]
    command += ["--judge-model", "/no/such/judge", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--judge-model: model folder /no/such/judge does not exist" in " ".join(result.stderr.split())


def test_the_services_take_their_feedback_model_from_the_backend_setting(other_family_model):
    """`cai serve critique|judge --backend transformers:FOLDER`: the services' own setting."""
    from services.client import AsyncClient
    from services.server import start_service
    from services.settings import load_settings

    async def main() -> None:
        backend = f"transformers:{other_family_model}"
        judge = await start_service("judge", load_settings("judge", backend=backend, port=0, metrics_port=0))
        critic = await start_service(
            "critique", load_settings("critique", backend=backend, port=0, metrics_port=0)
        )
        try:
            async with AsyncClient(judge.address) as client:
                turns = [{"role": "user", "content": "Name a fruit."}]
                reply = await client.compare(turns, "An apple.", "I won't say.")
            assert reply.model_id == other_family_model and 0 <= reply.p_a <= 1
            async with AsyncClient(critic.address) as client:
                turns = [
                    {"role": "user", "content": "Name a fruit."},
                    {"role": "assistant", "content": "No."},
                ]
                steps = [s async for s in client.critique_revise(turns, 1, [], seed=1)]
            assert len(steps) == 1 and steps[0].principle_id
        finally:
            await critic.stop(0)
            await judge.stop(0)

    asyncio.run(main())
