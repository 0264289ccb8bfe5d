"""Generated and mutated records on every stage's input topic, on a real broker (hypothesis), and
a backend outage that must not send valid records to the dead-letter topic.

Each stage runs on a FakeBackend in this process. A record is a valid one, a valid one with one
to three fields replaced by generated values (tests/reliability/fuzz.py), one whose bytes are
cut and put behind an illegal field tag, or one whose schema header is missing or wrong. Every
record must end up exactly once either as an output record or in `<topic>.dlq` (with the error
headers, not retried, and the error a domain error, not a crash), and every valid one as an
output."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cai import constitution
from cai.backends.base import Completion, SamplingParams
from cai.backends.fake import FakeBackend
from cai.engine import CritiqueChain, CritiqueStep
from cai.errors import ResourceExhausted, Unavailable
from cai.kafka import records
from cai.kafka.topics import TopicSpec, create_topics, dlq
from cai.records import Prompt, revision_of, rollout_of
from cai.v1 import records_pb2
from services.server import start_service
from tests.kafka.test_stream import prompt, push, push_prompts, read_all, wait_for
from tests.kafka.test_stream import settings as stage_settings
from tests.reliability import fuzz

CONSTITUTION = constitution.load("default")
CRASH = re.compile(r"^[A-Z]\w*(Error|Exception|Exit|Interrupt)\b")
OUTPUT = {"policy": "rollouts", "critique": "revisions", "judge": "preferences"}
OUTPUT_TYPE = {
    "rollouts": records_pb2.RolloutRecord,
    "revisions": records_pb2.RevisionRecord,
    "preferences": records_pb2.PreferenceRecord,
}
HINTS = {
    "role": [],
    "content": ["Hello", "Explain tides simply."],
    "principle_ids": [CONSTITUTION.principles[0].id],
}


def valid(kind: type, i: int) -> Any:
    """A valid record of `kind` for prompt `m{i}`."""
    prompt = Prompt(f"m{i:03d}", f"Explain tides simply, {i}.", "benign", seed=i)
    if kind is records_pb2.PromptRecord:
        return prompt.to_proto()
    rollout = rollout_of(
        prompt, [Completion("The moon.", 2, "stop"), Completion("Gravity.", 1, "stop")], "fake"
    )
    if kind is records_pb2.RolloutRecord:
        return rollout.to_proto()
    step = CritiqueStep(CONSTITUTION.principles[0].id, "Too short.", "The moon's pull raises the sea.")
    return revision_of(rollout, CritiqueChain("The moon.", [step]), CONSTITUTION, "fake").to_proto()


def set_prompt_id(message: Any, key: str) -> None:
    if isinstance(message, records_pb2.PromptRecord):
        message.prompt_id = key
    else:
        message.prompt.prompt_id = key


Item = tuple[str, bytes, list[tuple[str, bytes]], str]  # key, value, headers, what was done
Recipe = tuple[str, Any, int, list[tuple[str, bytes]] | None]  # how, message, cut at, headers


@st.composite
def recipe(draw: st.DrawFn, kind: type) -> Recipe:
    """How to damage a valid record of `kind`: replace fields, cut its bytes, or change its header."""
    how = draw(st.sampled_from(["valid", "fields", "fields", "fields", "bytes", "header"]))
    message = valid(kind, 0)
    if how == "fields":
        message = draw(fuzz.mutated(message, HINTS))
    headers = None
    if how == "header":
        wrong = [[], [(records.SCHEMA_HEADER, b"cai.v1.PromptRecord;v=1")]]
        wrong += [[(records.SCHEMA_HEADER, draw(st.binary(max_size=30)))]]
        headers = draw(st.sampled_from(wrong))
    return how, message, draw(st.integers(0, 10_000)), headers


def items_of(kind: type, count: int) -> list[Item]:
    """`count` records of `kind` drawn by hypothesis (varied, the same on every run), keyed
    m000, m001, ...; each record's prompt id is its key, so an output names its input."""
    recipes: list[Recipe] = []

    @settings(
        max_examples=count,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(recipe(kind))
    def collect(drawn: Recipe) -> None:
        recipes.append(drawn)

    collect()
    items = []
    for i, (how, message, cut, headers) in enumerate(recipes):
        key = f"m{i:03d}"
        set_prompt_id(message, key)
        value, encoded_headers = records.encode(message)
        if how == "bytes":
            # cut short, behind an illegal field number 0: never readable, whatever the cut
            value = b"\x00" + value[: cut % (len(value) + 1)]
        if len(value) > 500_000:  # past what the broker takes (1 MiB): the producer refuses it
            continue
        items.append((key, value, encoded_headers if headers is None else headers, how))
    return items


CASES = [
    ("policy", records_pb2.PromptRecord, {}),
    ("critique", records_pb2.RolloutRecord, {}),
    ("judge", records_pb2.RolloutRecord, {}),
    ("judge", records_pb2.RevisionRecord, {"judge_input": "revisions"}),
]


async def run_stage(bootstrap: str, name: str, kind: type, extra: dict[str, Any], items: list[Item]) -> None:
    prefix = f"f{uuid.uuid4().hex[:8]}."
    create_topics(bootstrap, TopicSpec(partitions=2), prefix=prefix)
    source = {
        records_pb2.PromptRecord: "prompts",
        records_pb2.RolloutRecord: "rollouts",
        records_pb2.RevisionRecord: "revisions",
    }[kind]
    push(bootstrap, prefix + source, [(k.encode(), v, h) for k, v, h, _ in items])
    service_settings = stage_settings(name, bootstrap, prefix, max_prompt_tokens=400, **extra)
    service = await start_service(name, service_settings, FakeBackend())
    stopping = asyncio.Event()
    task = asyncio.ensure_future(service.stream(service_settings).run(stopping))
    output = prefix + OUTPUT[name]
    try:
        keys = {k for k, *_ in items}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while True:
            outputs = await asyncio.to_thread(read_all, bootstrap, output)
            dead = await asyncio.to_thread(read_all, bootstrap, dlq(prefix + source))
            produced = [records.decode(OUTPUT_TYPE[OUTPUT[name]], o.value(), o.headers()) for o in outputs]
            done = [m.prompt.prompt_id for m in produced] + [d.key().decode() for d in dead]
            if set(done) >= keys or loop.time() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        stopping.set()
        await task
        await service.stop(0)
    assert sorted(done) == sorted(keys), "each record once, as an output or a dead letter"
    by_key = {k: how for k, _, _, how in items}
    written = {m.prompt.prompt_id for m in produced}
    assert {k for k, how in by_key.items() if how == "valid"} <= written
    assert not {k for k, how in by_key.items() if how in ("bytes", "header")} & written
    for d in dead:
        headers = dict(d.headers())
        assert headers["stage"] == name.encode() and headers["original-topic"] == (prefix + source).encode()
        assert headers["attempt"] == b"1", headers  # a bad record is refused at once, not retried
        error = headers["error"].decode()
        # a domain error reads "field: what is wrong"; anything else is "TypeError: ..."
        assert not CRASH.match(error), f"{d.key()!r}: a crash, not a refusal: {error}"


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kind", "extra"), CASES, ids=[f"{n}-{k.__name__}" for n, k, _ in CASES])
def test_mutated_records_go_to_the_dead_letter_topic_once_and_the_rest_flows(kafka_broker, name, kind, extra):
    asyncio.run(run_stage(kafka_broker.bootstrap, name, kind, extra, items_of(kind, 30)))


class Outage(FakeBackend):
    """Unavailable, then busy, for the first `failures` calls; then a working backend."""

    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures
        self.calls = 0

    async def generate(self, prompt: str, params: SamplingParams) -> list[Completion]:
        self.calls += 1
        if self.calls <= self.failures:
            raise (Unavailable if self.calls % 2 else ResourceExhausted)("backend: down for a test")
        return await super().generate(prompt, params)


async def test_a_stage_waits_out_a_backend_outage_instead_of_dead_lettering(kafka_broker):
    bootstrap = kafka_broker.bootstrap
    prefix = f"o{uuid.uuid4().hex[:8]}."
    create_topics(bootstrap, TopicSpec(partitions=1), prefix=prefix)
    push_prompts(bootstrap, prefix, [prompt(i) for i in range(3)])
    service_settings = stage_settings("policy", bootstrap, prefix, kafka_max_attempts=2)
    backend = Outage(failures=8)  # far more tries than kafka_max_attempts
    service = await start_service("policy", service_settings, backend)
    stream = service.stream(service_settings)
    stream.settings.retry_backoff_s = 0.05
    stopping = asyncio.Event()
    task = asyncio.ensure_future(stream.run(stopping))
    try:
        rollouts = await wait_for(bootstrap, prefix + "rollouts", records_pb2.RolloutRecord, 3)
    finally:
        stopping.set()
        await task
        await service.stop(0)
    assert {r.prompt.prompt_id for r in rollouts} == {f"p{i:03d}" for i in range(3)}
    assert not read_all(bootstrap, dlq(prefix + "prompts"))
    assert stream.counts["retried"] >= 8 and stream.counts["dead_lettered"] == 0
