"""Reading run folders (errors name file:line), the file source's order and state, tokenizing."""

from __future__ import annotations

import json

import pytest

from cai.errors import InvalidArgument
from trainer.data import FileSource, collate, encode, load_samples
from trainer.loss import IGNORE


def test_reads_what_the_pipeline_writes(run_dir, records):
    prefs = load_samples(run_dir / "preferences.jsonl", "dpo")
    sft = load_samples(run_dir / "sft.jsonl", "sft")
    assert len(prefs) == len(sft) == len(records)
    lines = [json.loads(line) for line in (run_dir / "preferences.jsonl").read_text().splitlines()]
    assert [s.sample_id for s in prefs] == [line["sample_id"] for line in lines]
    assert [s.p_chosen for s in prefs] == [line["p_chosen"] for line in lines]
    # the judge preferred the initial answer of the last record: it is the chosen one, p flipped
    assert prefs[-1].completions[0][0]["content"] == "Blue." and prefs[-1].p_chosen == pytest.approx(0.7)
    assert sft[1].completions[0] == [{"role": "assistant", "content": "Hi! How can I help?"}]
    assert sft[1].where.endswith("sft.jsonl:2")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"prompt": []}', "sample_id: must be a non-empty string"),
        ('{"sample_id": "x", "prompt": "hi"}', "prompt: expected a non-empty list of chat messages"),
        ('{"sample_id": "x", "prompt": [{"role": "user"}]}', "prompt[0]: expected"),
    ],
)
def test_bad_line_names_file_and_line(run_dir, line, message):
    path = run_dir / "preferences.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(2, line)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidArgument, match=rf"^{path}:3: .*{message}".replace("[", r"\[")):
        load_samples(path, "dpo")


def test_bad_label_and_role(run_dir):
    path = run_dir / "preferences.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["p_chosen"] = 1.5
    rows[3]["rejected"] = [{"role": "user", "content": "hm"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InvalidArgument, match=r"preferences.jsonl:2: p_chosen: must be a number in \[0, 1\]"):
        load_samples(path, "dpo")
    rows[1]["p_chosen"] = 0.5
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InvalidArgument, match=r"preferences.jsonl:4: rejected\[0\].role: expected 'assis"):
        load_samples(path, "dpo")


def test_file_source_order_and_resume(run_dir):
    samples = load_samples(run_dir / "sft.jsonl", "sft")

    def drain(source, n):
        return [s.sample_id for s in (source.next() for _ in range(n)) if s is not None]

    a = FileSource(samples, seed=1, epochs=2)
    first = drain(a, 7)
    state = a.state()
    rest = drain(a, 10)
    assert len(rest) == 3 and a.next() is None  # two epochs of five
    assert sorted(first[:5]) == sorted(s.sample_id for s in samples)
    b = FileSource(samples, seed=1, epochs=2)
    b.restore(state)
    assert drain(b, 10) == rest
    assert drain(FileSource(samples, seed=1, epochs=1), 5) == first[:5]
    assert drain(FileSource(samples, seed=2, epochs=1), 5) != first[:5]
    with pytest.raises(InvalidArgument, match="does not match this data"):
        FileSource(samples[:3], seed=1, epochs=2).restore(state)


@pytest.mark.integration  # the default model's tokenizer and chat template
def test_encode_masks_the_prompt(default_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    prompt = [{"role": "user", "content": "Say hi."}]
    completion = [{"role": "assistant", "content": "Hi there!"}]
    e = encode(tokenizer, prompt, completion, max_length=512)
    assert tokenizer.decode(e.ids[: e.prompt_len]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(e.ids[e.prompt_len :]).startswith("Hi there!<|im_end|>")
    short = encode(tokenizer, prompt, completion, max_length=8)
    # the prompt keeps its last max_length/2 tokens, the completion fills the rest
    assert short.truncated and len(short.ids) == 8 and short.prompt_len == 4
    assert short.ids[:4] == e.ids[e.prompt_len - 4 : e.prompt_len]
    assert short.ids[4:] == e.ids[e.prompt_len : e.prompt_len + 4]
    batch = collate([e, short], pad_id=0)
    assert batch.labels[0, : e.prompt_len].eq(IGNORE).all()
    assert batch.labels[0, e.prompt_len :].tolist() == e.ids[e.prompt_len :]
    assert batch.labels[1, 8:].eq(IGNORE).all() and batch.attention_mask[1].sum() == 8
