"""Operating the pipeline on Kafka: push prompts, and read each stage's progress (committed offsets,
lag, dead letters, throughput) from the outside, without joining any consumer group.

`pipeline_status` returns plain dataclasses, so the stages can export the same numbers as metrics.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from cai.errors import NotFound, Unavailable
from cai.kafka import client
from cai.kafka.records import encode
from cai.kafka.topics import INPUT_TOPICS, TOPICS, check_prefix, cluster_metadata, dlq, kafka_failure
from cai.v1 import records_pb2

if TYPE_CHECKING:
    from cai.records import Prompt

# Short: a wrong --kafka is reported in seconds. A single request to a live broker takes milliseconds.
TIMEOUT_MS = 5000
DELIVERY_TIMEOUT_MS = 60000
_TIMEOUT_S = TIMEOUT_MS / 1000

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
    except KafkaException as exc:
        raise kafka_failure(bootstrap, exc) from None


@contextlib.contextmanager
def _admin(bootstrap: str, client_id: str) -> Iterator[AdminClient]:
    with _kafka_errors(bootstrap), client.admin(bootstrap, client_id) as admin:
        yield admin


def _topic_partitions(admin: AdminClient, bootstrap: str, topics: Sequence[str]) -> dict[str, list[int]]:
    """{topic: partition numbers} of those of `topics` that exist."""
    # The metadata of every topic: asking for missing ones by name could have the broker create them.
    existing = cluster_metadata(admin, bootstrap, _TIMEOUT_S).topics
    return {topic: sorted(existing[topic].partitions) for topic in topics if topic in existing}


def topic_partitions(bootstrap: str, topics: Sequence[str]) -> dict[str, list[int]]:
    """{topic: partition numbers} of those of `topics` that exist on the cluster."""
    with _admin(bootstrap, "cai-topics") as admin:
        return _topic_partitions(admin, bootstrap, topics)


def _no_topic(bootstrap: str, topic: str, prefix: str) -> NotFound:
    flag = f" --prefix {prefix}" if prefix else ""
    return NotFound(
        f"topic {topic!r} does not exist on {bootstrap}; "
        f"create it with `cai topics create --kafka {bootstrap}{flag}`"
    )


# ---- prompts --------------------------------------------------------------------------------


def prompt_message(prompt: Prompt, seed: int) -> records_pb2.PromptRecord:
    """The prompts topic's record for one prompt; its seed is `cai up`'s per-prompt seed."""
    return prompt.seeded(seed).to_proto()


def _produce(
    producer: Producer, topic: str, message: records_pb2.PromptRecord, on_delivery: Callable[..., None]
) -> None:
    value, headers = encode(message)
    key = message.prompt_id.encode("utf-8")
    while True:
        try:
            # [*headers]: the stub wants a list of a wider (and invariant) item type than ours.
            producer.produce(topic, value=value, key=key, headers=[*headers], on_delivery=on_delivery)
            return
        except BufferError:  # the local queue is full: serving delivery reports makes room
            producer.poll(0.1)


def push_prompts(bootstrap: str, records: Sequence[Prompt], seed: int = 0, prefix: str = "") -> int:
    """Produce the prompts to `<prefix>prompts`, keyed by prompt id; return how many were written.

    When it returns, every record is acknowledged by all in-sync replicas. The producer is
    idempotent, so its own retries add no duplicates; pushing the same file again does (the stages
    drop them by their deterministic sample ids).
    """
    check_prefix(prefix)
    topic = prefix + "prompts"
    messages = [prompt_message(record, seed) for record in records]
    with _admin(bootstrap, "cai-prompts-push") as admin:
        if topic not in _topic_partitions(admin, bootstrap, [topic]):
            raise _no_topic(bootstrap, topic, prefix)
    failures: list[KafkaError] = []

    def delivered(error: KafkaError | None, _: Any) -> None:
        if error is not None:
            failures.append(error)

    with _kafka_errors(bootstrap):
        producer = client.producer(
            bootstrap, "cai-prompts-push", {"delivery.timeout.ms": DELIVERY_TIMEOUT_MS}, quiet=True
        )
        try:
            for message in messages:
                _produce(producer, topic, message, delivered)
            # Every record gets its delivery report (success or error) within the delivery timeout.
            left = producer.flush(DELIVERY_TIMEOUT_MS / 1000 + 5)
            if failures:
                raise kafka_failure(bootstrap, KafkaException(failures[0]))
            if left:
                raise Unavailable(f"--kafka {bootstrap}: {left} prompts were not acknowledged in time")
        finally:
            producer.purge()  # nothing is left after a full flush; after a failure, close() need not wait
            producer.close()
    return len(messages)


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


Key = tuple[str, int]  # topic, partition

# The first group lookup on a fresh broker creates __consumer_offsets; until that is ready the
# group's coordinator is "not available". Just after a topic is created or a broker restarts, a
# partition's leader may not be known yet. Both pass within seconds: ask again.
_STARTING = (
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.NOT_COORDINATOR,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
)
T = TypeVar("T")


def _retrying(request: Callable[[], T]) -> T:
    deadline = time.monotonic() + _TIMEOUT_S
    while True:
        try:
            return request()
        except KafkaException as exc:
            if exc.args[0].code() not in _STARTING or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _group_offsets(admin: AdminClient, group: str) -> dict[Key, int]:
    # One group per request: that is all librdkafka's ListConsumerGroupOffsets takes.
    found = _retrying(
        lambda: admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=_TIMEOUT_S
        )[group].result()
    )
    # A negative offset means nothing committed for that partition; a group that does not exist
    # has no partitions.
    return {(tp.topic, tp.partition): tp.offset for tp in found.topic_partitions or [] if tp.offset >= 0}


def _offsets(admin: AdminClient, keys: Sequence[Key], spec: OffsetSpec) -> dict[Key, int]:
    """The earliest or latest offset of each partition, in one request per partition leader."""

    def request() -> dict[Key, int]:
        futures = admin.list_offsets({TopicPartition(*key): spec for key in keys}, request_timeout=_TIMEOUT_S)
        return {(tp.topic, tp.partition): future.result().offset for tp, future in futures.items()}

    return _retrying(request)


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
        partitions = _topic_partitions(admin, bootstrap, [*names, *dead_letter_topics.values()])
        if not any(name in partitions for name in names):
            raise _no_topic(bootstrap, names[0], prefix)
        keys = [(topic, p) for topic, numbers in partitions.items() for p in numbers]
        beginning = _offsets(admin, keys, OffsetSpec.earliest())
        first_end = _offsets(admin, keys, OffsetSpec.latest())
        started = time.monotonic()
        time.sleep(max(0.0, window))
        # Committed offsets before end offsets: no commit can pass an end offset read after it.
        committed = {group: _group_offsets(admin, group) for group in groups}
        end = _offsets(admin, keys, OffsetSpec.latest())
        elapsed = time.monotonic() - started

    def total(topic: str, upper: Mapping[Key, int], lower: Mapping[Key, int]) -> int:
        return sum(upper[topic, p] - lower[topic, p] for p in partitions[topic])

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
        used = [topic for topic in inputs if any(t == topic for t, _ in offsets)]
        for topic in used or inputs[:1]:
            for p in partitions.get(topic, []):  # a missing topic shows in the topics table
                key = (topic, p)
                mark = offsets.get(key)
                # Records deleted by retention are no work left: count from the beginning at least.
                start = beginning[key] if mark is None else max(mark, beginning[key])
                lags.append(PartitionLag(group, topic, p, mark, end[key], max(0, end[key] - start)))
    return PipelineStatus(bootstrap, prefix, window, topics, lags)
