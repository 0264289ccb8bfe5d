"""The stream stages on a real broker. The services run on FakeBackends (instant, deterministic
text): these tests are about delivery (at least once, dead letters, crashes, restarts,
replicas), not about the model."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer

from cai import constitution
from cai.backends.fake import FakeBackend
from cai.kafka import records
from cai.kafka.topics import TopicSpec, create_topics, dlq
from cai.v1 import common_pb2, records_pb2
from services.processors import stream_stage
from services.server import start_service
from services.settings import load_settings

HERE = Path(__file__).parent


def prompt(i: int, words: int = 5) -> records_pb2.PromptRecord:
    text = " ".join(["please", "explain", "tides", "simply", f"#{i}"] + ["more"] * (words - 5))
    return records_pb2.PromptRecord(
        prompt_id=f"p{i:03d}",
        conversation=common_pb2.Conversation(
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)]
        ),
        category="benign",
        seed=1000 + i,
    )


def push(bootstrap: str, topic: str, items: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    for key, value, headers in items:
        producer.send(topic, key=key, value=value, headers=headers)
    producer.flush()
    producer.close()


def push_prompts(bootstrap: str, prefix: str, prompts: list[records_pb2.PromptRecord]) -> None:
    push(bootstrap, prefix + "prompts", [(p.prompt_id.encode(), *records.encode(p)) for p in prompts])


def read_all(bootstrap: str, topic: str) -> list[Any]:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=1500
    )
    items = list(consumer)
    consumer.close()
    return items


async def wait_for(bootstrap: str, topic: str, kind: type, count: int, timeout: float = 90) -> list[Any]:
    """The distinct records (by sample id) on `topic` once there are `count`, decoded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = {}
        for item in await asyncio.to_thread(read_all, bootstrap, topic):
            message = records.decode(kind, item.value, item.headers)
            found[message.metadata.sample_id] = message
        if len(found) >= count or loop.time() > deadline:
            return list(found.values())
        await asyncio.sleep(0.5)


def settings(name: str, bootstrap: str, prefix: str, **extra: Any):
    values = {
        "port": 0,
        "metrics_port": 0,
        "kafka": bootstrap,
        "kafka_prefix": prefix,
        "max_prompt_tokens": 60,
        **extra,
    }
    return load_settings(name, None, **values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def stages(
    bootstrap: str, prefix: str, names: tuple[str, ...], **extra: Any
) -> AsyncIterator[list[Any]]:
    """Services with their stream stages running in this process until the block ends."""
    stopping = asyncio.Event()
    running, tasks, streams = [], [], []
    for name in names:
        s = settings(name, bootstrap, prefix, **extra)
        service = await start_service(name, s, FakeBackend(delay_s=0.01))  # type: ignore[arg-type]
        stream = stream_stage(name, s, service.backend, service.engine)
        running.append(service)
        streams.append(stream)
        tasks.append(asyncio.ensure_future(stream.run(stopping)))
    try:
        yield streams
    finally:
        stopping.set()
        await asyncio.gather(*tasks)
        for service in running:
            await service.stop(0)


@pytest.fixture
def prefix(kafka_broker) -> str:
    name = f"t{uuid.uuid4().hex[:8]}."
    create_topics(kafka_broker.bootstrap, TopicSpec(partitions=3), prefix=name)
    return name


async def test_prompts_flow_to_rollouts_revisions_and_preferences(kafka_broker, prefix):
    bootstrap = kafka_broker.bootstrap
    push_prompts(bootstrap, prefix, [prompt(i) for i in range(12)])
    async with stages(bootstrap, prefix, ("policy", "critique", "judge")):
        rollouts = await wait_for(bootstrap, prefix + "rollouts", records_pb2.RolloutRecord, 12)
        revisions = await wait_for(bootstrap, prefix + "revisions", records_pb2.RevisionRecord, 12)
        preferences = await wait_for(bootstrap, prefix + "preferences", records_pb2.PreferenceRecord, 12)
    expected = {f"p{i:03d}" for i in range(12)}
    for found in (rollouts, revisions, preferences):
        assert len(found) == 12 and {r.metadata.prompt_id for r in found} == expected
    c = constitution.load("default")
    assert all(len(r.responses) == 2 and r.metadata.model_ids == ["fake"] for r in rollouts)
    for r in revisions:
        assert r.steps and r.final == r.steps[-1].revision and r.metadata.constitution_hash == c.hash
        assert r.metadata.principle_ids == [s.principle_id for s in r.steps]
    for p in preferences:
        assert 0.5 <= p.p_chosen <= 1 and p.labels and p.metadata.principle_ids
        assert {p.chosen, p.rejected} <= set(
            next(r.responses for r in rollouts if r.prompt.prompt_id == p.prompt.prompt_id)
        )
    assert not read_all(bootstrap, dlq(prefix + "prompts")) and not read_all(
        bootstrap, dlq(prefix + "rollouts")
    )


async def test_poison_records_go_to_the_dead_letter_topic_and_the_rest_flows(kafka_broker, prefix):
    bootstrap = kafka_broker.bootstrap
    good = [prompt(i) for i in range(6)]
    wrong_version = [(records.SCHEMA_HEADER, b"cai.v1.PromptRecord;v=99")]
    poison = [
        (b"garbage", b"\x00\xff not protobuf \xfe", records.encode(good[0])[1]),
        (b"old", good[1].SerializeToString(), wrong_version),
        (b"long", *records.encode(prompt(99, words=400))),
    ]
    push(
        bootstrap,
        prefix + "prompts",
        [*poison[:2], *[(p.prompt_id.encode(), *records.encode(p)) for p in good], poison[2]],
    )
    async with stages(bootstrap, prefix, ("policy",)):
        rollouts = await wait_for(bootstrap, prefix + "rollouts", records_pb2.RolloutRecord, 6)
        dead = []
        for _ in range(60):
            dead = await asyncio.to_thread(read_all, bootstrap, dlq(prefix + "prompts"))
            if len(dead) >= 3:
                break
    assert {r.prompt.prompt_id for r in rollouts} == {p.prompt_id for p in good}
    assert sorted(d.key for d in dead) == [b"garbage", b"long", b"old"]
    for d in dead:
        headers = dict(d.headers)
        assert headers["stage"] == b"policy" and headers["original-topic"] == (prefix + "prompts").encode()
        assert int(headers["original-offset"]) >= 0 and headers["original-partition"].isdigit()
        assert headers["attempt"] == b"1"  # permanent errors are not retried
    errors = {d.key: dict(d.headers)["error"].decode() for d in dead}
    assert "value" in errors[b"garbage"] and "v=99" in errors[b"old"] and "tokens" in errors[b"long"]
    assert next(d for d in dead if d.key == b"old").value == good[1].SerializeToString()  # kept as it came


def spawn_stage(
    name: str, bootstrap: str, prefix: str, delay_s: float, in_flight: int = 8
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE.parents[1]),
        f"CAI_{name.upper()}_KAFKA_MAX_IN_FLIGHT": str(in_flight),
    }
    return subprocess.Popen(
        [sys.executable, str(HERE / "fake_stage.py"), name, bootstrap, prefix, str(delay_s)], env=env
    )


async def test_a_stage_killed_mid_run_loses_nothing_after_restart(kafka_broker, prefix):
    bootstrap = kafka_broker.bootstrap
    push_prompts(bootstrap, prefix, [prompt(i) for i in range(40)])
    first = spawn_stage("policy", bootstrap, prefix, delay_s=2.0, in_flight=2)  # about 4 records/s
    try:
        seen: list[Any] = []
        for _ in range(240):  # until the stage is part-way through
            seen = await asyncio.to_thread(read_all, bootstrap, prefix + "rollouts")
            if len(seen) >= 5:
                break
        assert 5 <= len(seen) < 40, "the stage should be mid-run"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    second = spawn_stage("policy", bootstrap, prefix, delay_s=0.0)
    try:
        rollouts = await wait_for(bootstrap, prefix + "rollouts", records_pb2.RolloutRecord, 40, timeout=180)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    assert {r.prompt.prompt_id for r in rollouts} == {f"p{i:03d}" for i in range(40)}
    raw = read_all(bootstrap, prefix + "rollouts")
    by_id: dict[str, set[bytes]] = {}
    for item in raw:
        message = records.decode(records_pb2.RolloutRecord, item.value, item.headers)
        by_id.setdefault(message.metadata.sample_id, set()).add(message.prompt.prompt_id.encode())
    # Replayed records are duplicates with the same sample id (and prompt), never a second id.
    assert len(by_id) == 40 and all(len(prompts) == 1 for prompts in by_id.values())
    assert len(raw) >= 40


async def test_a_broker_restart_mid_run_loses_nothing(kafka_broker, prefix):
    bootstrap = kafka_broker.bootstrap
    push_prompts(bootstrap, prefix, [prompt(i) for i in range(30)])
    async with stages(bootstrap, prefix, ("policy",)) as [stream]:
        for _ in range(200):
            if stream.counts["processed"] >= 3:
                break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(kafka_broker.restart)
        rollouts = await wait_for(bootstrap, prefix + "rollouts", records_pb2.RolloutRecord, 30, timeout=180)
    assert {r.prompt.prompt_id for r in rollouts} == {f"p{i:03d}" for i in range(30)}


async def test_two_replicas_in_one_group_split_the_partitions(kafka_broker, prefix):
    bootstrap = kafka_broker.bootstrap
    push_prompts(bootstrap, prefix, [prompt(i) for i in range(30)])
    async with stages(bootstrap, prefix, ("policy", "policy")) as replicas:
        rollouts = await wait_for(bootstrap, prefix + "rollouts", records_pb2.RolloutRecord, 30)
    assert {r.prompt.prompt_id for r in rollouts} == {f"p{i:03d}" for i in range(30)}
    assert all(r.counts["processed"] > 0 for r in replicas)  # both got partitions
    assert sum(r.counts["processed"] for r in replicas) >= 30
