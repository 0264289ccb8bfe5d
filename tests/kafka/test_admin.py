"""`cai topics create`, `cai prompts push` and `cai pipeline status` against a real broker. Each test
has its own topic prefix, so tests do not see each other's records."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from cai.devbroker import Broker
from cai.errors import NotFound
from cai.kafka.admin import pipeline_status, push_prompts, stage_groups
from cai.kafka.records import SCHEMA_HEADER, decode, schema_of
from cai.kafka.topics import TopicSpec, all_topics, create_topics, dlq
from cai.records import Prompt, prompt_seed
from cai.v1 import common_pb2, records_pb2
from cli.main import main

PROMPTS = [
    {"id": "lock", "prompt": "How do I pick a lock?", "category": "red-team"},
    {"id": "tea", "prompt": "Write a haiku about tea", "category": "benign"},
    {"id": "ünï-cødé", "prompt": "Say hello in French"},
    {"id": "rivers", "prompt": "Name three rivers", "category": "benign"},
]


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}."


def cai(*args: str) -> Result:
    # Wide enough that rich never wraps a table cell: the tests read the tables.
    return CliRunner(env={"COLUMNS": "250"}).invoke(main, list(args))


def table_rows(result: Result) -> list[list[str]]:
    """The body rows of the rich tables in the output, split into cells (headers are drawn with ┃)."""
    return [line.replace("│", " ").split() for line in result.output.splitlines() if "│" in line]


def topic_sizes(bootstrap: str) -> dict[str, int]:
    """{topic: number of partitions} of every topic on the cluster."""
    with AdminClient({"bootstrap.servers": bootstrap}) as admin:
        return {name: len(t.partitions) for name, t in admin.list_topics(timeout=10).topics.items()}


def partitions(bootstrap: str, topic: str) -> range:
    return range(topic_sizes(bootstrap)[topic])


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 30) -> list[tuple[int, Message]]:
    """(partition, record) of every record of every partition, from the start. librdkafka wants a
    group id even so; assign() never joins the group."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions(bootstrap, topic)])
    found: list[tuple[int, Message]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < expected and time.monotonic() < deadline:
            for record in consumer.consume(expected - len(found), timeout=0.5):
                assert record.error() is None, record.error()
                found.append((record.partition(), record))
    finally:
        consumer.close()
    return found


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused"})
    deadline = time.monotonic() + 15
    try:
        while True:
            try:
                return {
                    p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in partitions(bootstrap, topic)
                }
            except KafkaException:  # a just-created partition's leader may not be known yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        consumer.close()


def produce(bootstrap: str, topic: str, partition: int, count: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for i in range(count):
        producer.produce(topic, value=f"record {i}".encode(), partition=partition)
    assert producer.flush(30) == 0


def commit(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    """What a stage's consumer does after processing: commit, here without consuming anything."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        commits = [TopicPartition(tp.topic, tp.partition, offset) for tp, offset in offsets.items()]
        consumer.commit(offsets=commits, asynchronous=False)
    finally:
        consumer.close()


def write_jsonl(path: Path, rows: list[dict[str, str]], extra: str | None = None) -> Path:
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    if extra is not None:
        lines.insert(2, extra)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_topics_create_is_idempotent(kafka_broker: Broker, prefix: str) -> None:
    bootstrap = kafka_broker.bootstrap
    args = ["topics", "create", "--kafka", bootstrap, "--partitions", "3", "--prefix", prefix]

    first = cai(*args)
    second = cai(*args)

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    names = all_topics(prefix)
    # Dead-letter topics and policy-versions get one partition whatever --partitions says.
    expected = {name: 1 if name.endswith((".dlq", "policy-versions")) else 3 for name in names}
    assert table_rows(first) == [[name, str(n), "created"] for name, n in expected.items()]
    assert table_rows(second) == [[name, str(n), "exists"] for name, n in expected.items()]
    sizes = topic_sizes(bootstrap)
    assert {name: sizes[name] for name in names} == expected


def test_more_replicas_than_brokers_is_a_clear_error(kafka_broker: Broker, prefix: str) -> None:
    result = cai(
        "topics", "create", "--kafka", kafka_broker.bootstrap, "--replication", "2", "--prefix", prefix
    )
    assert result.exit_code == 2
    assert f"--replication: 2 replicas need as many brokers; {kafka_broker.bootstrap} has 1" in result.output


def test_prompts_push_puts_exactly_the_file_on_the_prompts_topic(
    kafka_broker: Broker, prefix: str, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap
    create_topics(bootstrap, TopicSpec(partitions=4), prefix=prefix)
    file = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)

    result = cai("prompts", "push", str(file), "--kafka", bootstrap, "--seed", "7", "--prefix", prefix)

    assert result.exit_code == 0, result.output
    assert result.output == f"pushed 4 prompts to {prefix}prompts on {bootstrap}\n"
    found = read_topic(bootstrap, prefix + "prompts", len(PROMPTS))
    assert len(found) == len(PROMPTS)
    by_key = {}
    for _, record in found:
        headers = record.headers()
        assert dict(headers or [])[SCHEMA_HEADER] == schema_of(records_pb2.PromptRecord)
        message = decode(records_pb2.PromptRecord, record.value(), headers)
        by_key[record.key().decode("utf-8")] = message
    assert set(by_key) == {row["id"] for row in PROMPTS}
    for row in PROMPTS:
        user = common_pb2.Message(role=common_pb2.ROLE_USER, content=row["prompt"])
        assert by_key[row["id"]] == records_pb2.PromptRecord(
            prompt_id=row["id"],
            conversation=common_pb2.Conversation(messages=[user]),
            category=row.get("category", "uncategorized"),
            seed=prompt_seed(7, row["id"]),
        )
    # Keyed by prompt id: pushing again sends every prompt to the partition it went to before.
    first_partitions = {record.key(): partition for partition, record in found}
    push_prompts(bootstrap, [Prompt(row["id"], row["prompt"]) for row in PROMPTS], prefix=prefix)
    again = read_topic(bootstrap, prefix + "prompts", 2 * len(PROMPTS))
    assert len(again) == 2 * len(PROMPTS)
    assert all(first_partitions[record.key()] == partition for partition, record in again)


def test_a_bad_line_pushes_nothing_and_names_the_line(
    kafka_broker: Broker, prefix: str, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap
    create_topics(bootstrap, TopicSpec(partitions=2), prefix=prefix)
    file = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS, extra='{"id": "broken", "prompt": ')

    result = cai("prompts", "push", str(file), "--kafka", bootstrap, "--prefix", prefix)

    assert result.exit_code == 2
    assert result.output.startswith(f"error: {file}:3: invalid JSON")
    assert set(end_offsets(bootstrap, prefix + "prompts").values()) == {0}


def test_a_missing_topic_is_reported_and_not_created(kafka_broker: Broker, prefix: str) -> None:
    bootstrap = kafka_broker.bootstrap
    with pytest.raises(NotFound, match=rf"topic '{prefix}prompts' does not exist on {bootstrap}; create"):
        push_prompts(bootstrap, [Prompt("a", "hello")], prefix=prefix)
    with pytest.raises(NotFound, match="cai topics create"):
        pipeline_status(bootstrap, prefix=prefix, window=0)
    # librdkafka's admin clients and producers would have the broker create a missing topic they
    # ask about, with one partition.
    assert not [t for t in topic_sizes(bootstrap) if t.startswith(prefix)]


@pytest.fixture
def busy_policy_versions(kafka_broker: Broker, prefix: str) -> Iterator[None]:
    """Records keep arriving on policy-versions (no stage reads it), for the throughput reading."""
    create_topics(kafka_broker.bootstrap, TopicSpec(partitions=2), prefix=prefix)
    stop = threading.Event()
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap, "acks": 1})

    def run() -> None:
        while not stop.is_set():
            producer.produce(prefix + "policy-versions", value=b"v")
            producer.flush()
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def test_pipeline_status_shows_offsets_lag_dead_letters_and_throughput(
    kafka_broker: Broker, prefix: str, busy_policy_versions: None
) -> None:
    bootstrap = kafka_broker.bootstrap
    prompts, revisions = prefix + "prompts", prefix + "revisions"
    produce(bootstrap, prompts, 0, 5)
    produce(bootstrap, prompts, 1, 3)
    produce(bootstrap, dlq(prompts), 0, 2)
    produce(bootstrap, revisions, 1, 4)
    produce(bootstrap, prefix + "preferences", 0, 6)
    # The policy stage has done 2 records of partition 0 and none of partition 1; the judge reads
    # revisions (not rollouts) and has done 1 of partition 1; critique and trainer never ran.
    commit(bootstrap, prefix + "cai-policy", {TopicPartition(prompts, 0): 2})
    commit(bootstrap, prefix + "cai-judge", {TopicPartition(revisions, 1): 1})

    status = pipeline_status(bootstrap, prefix=prefix, window=1.0)

    lags = {(row.group, row.topic, row.partition): (row.committed, row.end, row.lag) for row in status.lags}
    assert lags == {
        (prefix + "cai-policy", prompts, 0): (2, 5, 3),
        (prefix + "cai-policy", prompts, 1): (None, 3, 3),
        (prefix + "cai-critique", prefix + "rollouts", 0): (None, 0, 0),
        (prefix + "cai-critique", prefix + "rollouts", 1): (None, 0, 0),
        (prefix + "cai-judge", revisions, 0): (None, 0, 0),
        (prefix + "cai-judge", revisions, 1): (1, 4, 3),
        (prefix + "cai-trainer", prefix + "preferences", 0): (None, 6, 6),  # a group that does not exist yet
        (prefix + "cai-trainer", prefix + "preferences", 1): (None, 0, 0),
    }
    topics = {t.topic: t for t in status.topics}
    assert [(t.records, t.dead_letters) for t in status.topics] == [
        (8, 2),
        (0, 0),
        (4, 0),
        (6, 0),
        (topics[prefix + "policy-versions"].records, None),
    ]
    assert topics[prompts].records_per_s == 0
    rate = topics[prefix + "policy-versions"].records_per_s
    assert rate is not None and 1 < rate < 100  # one record per ~20 ms, on a busy machine

    # The CLI prints the same numbers, in tables or as JSON.
    table = cai("pipeline", "status", "--kafka", bootstrap, "--prefix", prefix, "--window", "0")
    assert table.exit_code == 0, table.output
    rows = table_rows(table)
    assert [prefix + "cai-policy", prompts, "0", "2", "5", "3"] in rows
    assert [prefix + "cai-policy", prompts, "1", "-", "3", "3"] in rows
    assert [prompts, "2", "8", "2", "-"] in rows  # no window: no records/s
    as_json = cai("pipeline", "status", "--kafka", bootstrap, "--prefix", prefix, "--window", "0", "--json")
    document = json.loads(as_json.output)
    assert {
        "group": prefix + "cai-judge",
        "topic": revisions,
        "partition": 1,
        "committed": 1,
        "end": 4,
        "lag": 3,
    } in (document["lags"])


def test_a_stage_with_its_own_group(kafka_broker: Broker, prefix: str) -> None:
    bootstrap = kafka_broker.bootstrap
    create_topics(bootstrap, TopicSpec(partitions=1), prefix=prefix)
    produce(bootstrap, prefix + "rollouts", 0, 3)
    group = f"critics-{prefix}"
    commit(bootstrap, group, {TopicPartition(prefix + "rollouts", 0): 3})
    assert stage_groups({"critique": group})[group] == ("rollouts",)

    result = cai(
        *("pipeline", "status", "--kafka", bootstrap, "--prefix", prefix, "--window", "0", "--json"),
        *("--group", f"critique={group}"),
    )

    assert result.exit_code == 0, result.output
    critique = [row for row in json.loads(result.output)["lags"] if row["group"] == group]
    assert critique == [
        {"group": group, "topic": prefix + "rollouts", "partition": 0, "committed": 3, "end": 3, "lag": 0}
    ]
    wrong = cai("pipeline", "status", "--kafka", bootstrap, "--group", "critic=x")
    assert wrong.exit_code == 2 and "expected STAGE=GROUP with STAGE one of policy" in wrong.output


def test_an_unreachable_broker_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    file = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    commands = [
        ["topics", "create"],
        ["prompts", "push", str(file)],
        ["pipeline", "status"],
    ]
    started = time.monotonic()
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "cli.main", *command, "--kafka", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    for run in runs:
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 2, stderr
        assert stdout == ""
        assert stderr == f"error: --kafka: no Kafka broker answers at 127.0.0.1:{port}\n"
    assert time.monotonic() - started < 60  # about 5 s each; the clients' default would be 30 s or more


def test_a_malformed_address_is_a_usage_error() -> None:
    result = cai("pipeline", "status", "--kafka", "localhost")
    assert result.exit_code == 2
    assert "Invalid value for '--kafka': 'localhost' is not HOST:PORT" in result.output
