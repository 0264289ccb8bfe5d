"""Operating the pipeline on Kafka: push prompts, and read each stage's progress (committed offsets,
lag, dead letters, throughput) from the outside, without joining any consumer group.

`pipeline_status` returns plain dataclasses, so the stages can export the same numbers as metrics.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, RetriableError

from cai.errors import NotFound
from cai.kafka.records import encode
from cai.kafka.topics import INPUT_TOPICS, TOPICS, check_prefix, dlq, kafka_failure
from cai.v1 import common_pb2, records_pb2

if TYPE_CHECKING:
    from cai.pipeline import PromptRecord

# Short: a wrong --kafka is reported in seconds. A single request to a live broker takes milliseconds.
TIMEOUT_MS = 5000
DELIVERY_TIMEOUT_MS = 60000

# The topics each stage may read, the usual one first. The judge reads rollouts (two sampled
# answers) or revisions (a revision against its initial answer); the topics its group has
# committed offsets for tell which.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "policy": ("prompts",),
    "critique": ("rollouts",),
    "judge": ("rollouts", "revisions"),
    "trainer": ("preferences",),
}


def stage_group(stage: str, prefix: str = "") -> str:
    """A stage's default consumer group; prefixed like the topics, so pipelines sharing a cluster
    never share a group."""
    return f"{prefix}cai-{stage}"


def stage_groups(overrides: Mapping[str, str] | None = None, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """{consumer group: its input topics}; a stage's group is `PREFIXcai-STAGE` unless overridden."""
    overrides = overrides or {}
    return {
        overrides.get(stage, stage_group(stage, prefix)): topics for stage, topics in STAGE_INPUTS.items()
    }


@contextlib.contextmanager
def _kafka_errors(bootstrap: str) -> Iterator[None]:
    try:
        yield
    except KafkaError as exc:
        raise kafka_failure(bootstrap, exc) from None


@contextlib.contextmanager
def _admin(bootstrap: str, client_id: str) -> Iterator[KafkaAdminClient]:
    with _kafka_errors(bootstrap):
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            request_timeout_ms=TIMEOUT_MS,
            bootstrap_timeout_ms=TIMEOUT_MS,
        )
        try:
            yield admin
        finally:
            admin.close()


def _topic_partitions(admin: KafkaAdminClient, topics: Sequence[str]) -> dict[str, list[int]]:
    """{topic: partition numbers} of those of `topics` that exist.

    Only existing topics may reach a consumer or producer: kafka-python 3.0.12 ignores
    `allow_auto_create_topics=False`, and the broker would create a missing topic with 1 partition.
    """
    existing = set(admin.list_topics())
    wanted = [topic for topic in topics if topic in existing]
    if not wanted:
        return {}
    described = admin.describe_topics(wanted)
    return {t["name"]: sorted(p["partition_index"] for p in t["partitions"]) for t in described}


def topic_partitions(bootstrap: str, topics: Sequence[str]) -> dict[str, list[int]]:
    """{topic: partition numbers} of those of `topics` that exist on the cluster."""
    with _admin(bootstrap, "cai-topics") as admin:
        return _topic_partitions(admin, topics)


def _no_topic(bootstrap: str, topic: str, prefix: str) -> NotFound:
    flag = f" --prefix {prefix}" if prefix else ""
    return NotFound(
        f"topic {topic!r} does not exist on {bootstrap}; "
        f"create it with `cai topics create --kafka {bootstrap}{flag}`"
    )


# ---- prompts --------------------------------------------------------------------------------


def prompt_message(record: PromptRecord, seed: int) -> records_pb2.PromptRecord:
    """The prompts topic's record for one prompt; its seed is `cai up`'s per-prompt seed."""
    from cai.pipeline import prompt_seed

    user = common_pb2.Message(role=common_pb2.ROLE_USER, content=record.prompt)
    return records_pb2.PromptRecord(
        prompt_id=record.id,
        conversation=common_pb2.Conversation(messages=[user]),
        category=record.category,
        seed=prompt_seed(seed, record.id),
    )


def push_prompts(bootstrap: str, records: Sequence[PromptRecord], seed: int = 0, prefix: str = "") -> int:
    """Produce the prompts to `<prefix>prompts`, keyed by prompt id; return how many were written.

    When it returns, every record is acknowledged by all in-sync replicas. The producer is
    idempotent, so its own retries add no duplicates; pushing the same file again does (the stages
    drop them by their deterministic sample ids).
    """
    check_prefix(prefix)
    topic = prefix + "prompts"
    messages = [prompt_message(record, seed) for record in records]
    with _admin(bootstrap, "cai-prompts-push") as admin:
        if topic not in _topic_partitions(admin, [topic]):
            raise _no_topic(bootstrap, topic, prefix)
    with _kafka_errors(bootstrap):
        producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            client_id="cai-prompts-push",
            acks="all",
            enable_idempotence=True,
            bootstrap_timeout_ms=TIMEOUT_MS,
            delivery_timeout_ms=DELIVERY_TIMEOUT_MS,
        )
        try:
            futures = []
            for message in messages:
                value, headers = encode(message)
                key = message.prompt_id.encode("utf-8")
                futures.append(producer.send(topic, key=key, value=value, headers=headers))
            producer.flush(timeout=DELIVERY_TIMEOUT_MS / 1000)
            for future in futures:
                future.get(timeout=0)  # raises the first delivery failure, if any
        finally:
            producer.close(timeout=5)
    return len(futures)


# ---- status ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionLag:
    """One partition of a stage's input topic, as its consumer group sees it."""

    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group has committed nothing here (or does not exist yet)
    end: int
    lag: int  # records still to read: end minus the committed offset (or minus the beginning)


@dataclass(frozen=True)
class TopicStats:
    topic: str
    exists: bool
    partitions: int
    records: int | None  # held now: end minus beginning offsets, summed over partitions
    dead_letters: int | None  # records in `<topic>.dlq`; None when the topic has no (existing) DLQ
    records_per_s: float | None  # appended during the sampling window; None without a window


@dataclass(frozen=True)
class PipelineStatus:
    bootstrap: str
    prefix: str
    window_s: float
    topics: list[TopicStats]
    lags: list[PartitionLag]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _committed_offsets(
    admin: KafkaAdminClient, groups: Sequence[str]
) -> dict[str, dict[TopicPartition, int]]:
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while True:
        try:
            found = admin.list_group_offsets({group: None for group in groups})
            break
        except RetriableError:
            # The first group lookup on a fresh broker creates __consumer_offsets; until that is
            # ready the coordinator is "not available".
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    # An offset of -1 means nothing committed for that partition.
    return {
        group: {tp: meta.offset for tp, meta in found.get(group, {}).items() if meta.offset >= 0}
        for group in groups
    }


def pipeline_status(
    bootstrap: str,
    prefix: str = "",
    window: float = 2.0,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> PipelineStatus:
    """Offsets, lag per stage group and partition, records, dead letters and throughput per topic.

    `window`: seconds between two readings of the end offsets, for records/s (0: no throughput).
    `groups`: {group: the topics it may read, unprefixed, the default first}; default: the stages' groups.
    """
    check_prefix(prefix)
    groups = groups or stage_groups(prefix=prefix)
    names = [prefix + topic for topic in TOPICS]
    dead_letter_topics = {prefix + topic: dlq(prefix + topic) for topic in INPUT_TOPICS}
    with _admin(bootstrap, "cai-pipeline-status") as admin:
        partitions = _topic_partitions(admin, [*names, *dead_letter_topics.values()])
        if not any(name in partitions for name in names):
            raise _no_topic(bootstrap, names[0], prefix)
        tps = [TopicPartition(topic, p) for topic, numbers in partitions.items() for p in numbers]
        # No group and no subscription: this consumer only asks for offsets.
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id="cai-pipeline-status",
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=TIMEOUT_MS,
            bootstrap_timeout_ms=TIMEOUT_MS,
        )
        try:
            beginning = consumer.beginning_offsets(tps)
            first_end = consumer.end_offsets(tps)
            started = time.monotonic()
            time.sleep(max(0.0, window))
            # Committed offsets before end offsets: no commit can pass an end offset read after it.
            committed = _committed_offsets(admin, list(groups))
            end = consumer.end_offsets(tps)
            elapsed = time.monotonic() - started
        finally:
            consumer.close()

    def total(topic: str, upper: Mapping[TopicPartition, int], lower: Mapping[TopicPartition, int]) -> int:
        return sum(
            upper[TopicPartition(topic, p)] - lower[TopicPartition(topic, p)] for p in partitions[topic]
        )

    topics = []
    for name in names:
        if name not in partitions:
            topics.append(TopicStats(name, False, 0, None, None, None))
            continue
        dead = dead_letter_topics.get(name)
        topics.append(
            TopicStats(
                topic=name,
                exists=True,
                partitions=len(partitions[name]),
                records=total(name, end, beginning),
                dead_letters=total(dead, end, beginning) if dead is not None and dead in partitions else None,
                records_per_s=total(name, end, first_end) / elapsed if window > 0 else None,
            )
        )

    lags = []
    for group, candidates in groups.items():
        offsets = committed[group]
        inputs = [prefix + topic for topic in candidates]
        used = [topic for topic in inputs if any(tp.topic == topic for tp in offsets)]
        for topic in used or inputs[:1]:
            for p in partitions.get(topic, []):  # a missing topic shows in the topics table
                tp = TopicPartition(topic, p)
                mark = offsets.get(tp)
                # Records deleted by retention are no work left: count from the beginning at least.
                start = beginning[tp] if mark is None else max(mark, beginning[tp])
                lags.append(PartitionLag(group, topic, p, mark, end[tp], max(0, end[tp] - start)))
    return PipelineStatus(bootstrap, prefix, window, topics, lags)
