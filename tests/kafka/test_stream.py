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
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, ConsumerGroupState, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from cai import constitution
from cai.backends.fake import FakeBackend
from cai.kafka import records
from cai.kafka.admin import stage_group
from cai.kafka.topics import TopicSpec, create_topics, dlq
from cai.v1 import common_pb2, records_pb2
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
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value, headers in items:
        producer.produce(topic, key=key, value=value, headers=headers)
    assert producer.flush(30) == 0


def push_prompts(bootstrap: str, prefix: str, prompts: list[records_pb2.PromptRecord]) -> None:
    push(bootstrap, prefix + "prompts", [(p.prompt_id.encode(), *records.encode(p)) for p in prompts])


def read_all(bootstrap: str, topic: str) -> list[Message]:
    """Every record on `topic` right now, read without a consumer group."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False})
    try:
        ends, start = {}, []
        for partition in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high > low:
                ends[partition] = high
                start.append(TopicPartition(topic, partition, low))
        consumer.assign(start)
        items: list[Message] = []
        deadline = time.monotonic() + 30
        while ends and time.monotonic() < deadline:
            for item in consumer.consume(500, 0.5):
                if item.error() is None:
                    items.append(item)
                    if item.offset() + 1 >= ends.get(item.partition(), 0):
                        ends.pop(item.partition(), None)
        assert not ends, f"{topic}: could not read to the end of partitions {sorted(ends)}"
        return items
    finally:
        consumer.close()


async def wait_for(bootstrap: str, topic: str, kind: type, count: int, timeout: float = 90) -> list[Any]:
    """The distinct records (by sample id) on `topic` once there are `count`, decoded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = {}
        try:
            items = await asyncio.to_thread(read_all, bootstrap, topic)
        except KafkaException:  # e.g. no leader yet, just after a broker restart
            items = []
        for item in items:
            message = records.decode(kind, item.value(), item.headers())
            found[message.metadata.sample_id] = message
        if len(found) >= count or loop.time() > deadline:
            return list(found.values())
        await asyncio.sleep(0.5)


def group_assignments(bootstrap: str, group: str, members: int, timeout: float = 60) -> list[list[int]]:
    """The partitions of each member of `group`, once it is stable with `members` members."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = admin.describe_consumer_groups([group])[group].result()
            if found.state == ConsumerGroupState.STABLE and len(found.members) == members:
                return [[tp.partition for tp in m.assignment.topic_partitions] for m in found.members]
            state = f"{found.state}, {len(found.members)} members"
        except KafkaException as exc:  # e.g. the offsets topic is still loading on a fresh broker
            state = str(exc)
        assert time.monotonic() < deadline, f"{group}: {state}"
        time.sleep(0.5)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


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
) -> AsyncIterator[list[tuple[Any, Any]]]:
    """Services with their stream stages running in this process until the block ends."""
    stopping = asyncio.Event()
    running, tasks = [], []
    for name in names:
        s = settings(name, bootstrap, prefix, **extra)
        service = await start_service(name, s, FakeBackend(delay_s=0.01))  # type: ignore[arg-type]
        stream = service.stream(s)
        running.append((service, stream))
        tasks.append(asyncio.ensure_future(stream.run(stopping)))
    try:
        yield running
    finally:
        stopping.set()
        await asyncio.gather(*tasks)
        for service, _ in running:
            await service.stop(0)


@pytest.fixture
def prefix(kafka_broker) -> str:
    name = f"t{uuid.uuid4().hex[:8]}."
    create_topics(kafka_broker.bootstrap, TopicSpec(partitions=3), prefix=name)
    return name


async def test_prompts_flow_to_rollouts_revisions_and_preferences(kafka_broker, prefix):
    bootstrap = kafka_broker.bootstrap
    push_prompts(bootstrap, prefix, [prompt(i) for i in range(12)])
    async with stages(bootstrap, prefix, ("policy", "critique", "judge")) as services:
        rollouts = await wait_for(bootstrap, prefix + "rollouts", records_pb2.RolloutRecord, 12)
        revisions = await wait_for(bootstrap, prefix + "revisions", records_pb2.RevisionRecord, 12)
        preferences = await wait_for(bootstrap, prefix + "preferences", records_pb2.PreferenceRecord, 12)
        await asyncio.sleep(1.5)  # the stages report their lag at each commit
        metrics = [await asyncio.to_thread(scrape, service.metrics_port) for service, _ in services]
    for (service, _), text in zip(services, metrics, strict=True):
        # What `cai pipeline status` shows, on each stage's Prometheus port.
        processed = f'cai_stream_records_total{{outcome="processed",stage="{service.name}"}} 12.0'
        assert processed in text, text
        lags = [line for line in text.splitlines() if line.startswith("cai_stream_lag{")]
        assert lags and all(line.endswith(" 0.0") for line in lags), lags
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
    assert sorted(d.key() for d in dead) == [b"garbage", b"long", b"old"]
    for d in dead:
        headers = dict(d.headers())
        assert headers["stage"] == b"policy" and headers["original-topic"] == (prefix + "prompts").encode()
        assert int(headers["original-offset"]) >= 0 and headers["original-partition"].isdigit()
        assert headers["attempt"] == b"1"  # permanent errors are not retried
    errors = {d.key(): dict(d.headers())["error"].decode() for d in dead}
    assert "value" in errors[b"garbage"] and "v=99" in errors[b"old"] and "tokens" in errors[b"long"]
    assert (
        next(d for d in dead if d.key() == b"old").value() == good[1].SerializeToString()
    )  # kept as it came


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
        message = records.decode(records_pb2.RolloutRecord, item.value(), item.headers())
        by_id.setdefault(message.metadata.sample_id, set()).add(message.prompt.prompt_id.encode())
    # Replayed records are duplicates with the same sample id (and prompt), never a second id.
    assert len(by_id) == 40 and all(len(prompts) == 1 for prompts in by_id.values())
    assert len(raw) >= 40


async def test_a_broker_restart_mid_run_loses_nothing(kafka_broker, prefix):
    bootstrap = kafka_broker.bootstrap
    push_prompts(bootstrap, prefix, [prompt(i) for i in range(30)])
    async with stages(bootstrap, prefix, ("policy",)) as [(_, stream)]:
        for _ in range(200):
            if stream.counts["processed"] >= 3:
                break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(kafka_broker.restart)
        rollouts = await wait_for(bootstrap, prefix + "rollouts", records_pb2.RolloutRecord, 30, timeout=180)
    assert {r.prompt.prompt_id for r in rollouts} == {f"p{i:03d}" for i in range(30)}


async def test_two_replicas_in_one_group_split_the_partitions(kafka_broker, prefix):
    bootstrap = kafka_broker.bootstrap
    async with stages(bootstrap, prefix, ("policy", "policy")) as replicas:
        # Prompts only once both replicas hold partitions: else the first could do all the work.
        assignments = await asyncio.to_thread(group_assignments, bootstrap, stage_group("policy", prefix), 2)
        assert sorted(p for a in assignments for p in a) == [0, 1, 2] and all(assignments)
        push_prompts(bootstrap, prefix, [prompt(i) for i in range(30)])
        rollouts = await wait_for(bootstrap, prefix + "rollouts", records_pb2.RolloutRecord, 30)
    assert {r.prompt.prompt_id for r in rollouts} == {f"p{i:03d}" for i in range(30)}
    assert all(stream.counts["processed"] > 0 for _, stream in replicas)  # both got partitions
    assert sum(stream.counts["processed"] for _, stream in replicas) >= 30
