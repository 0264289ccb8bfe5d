"""The pipeline's topics and their creation (idempotent)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cai.errors import CAIError, InvalidArgument, Unavailable

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient, ClusterMetadata

# The input topics of a stage or of the trainer get a dead-letter topic: `<topic>.dlq`.
TOPICS = ("prompts", "rollouts", "revisions", "preferences", "policy-versions")
INPUT_TOPICS = ("prompts", "rollouts", "revisions", "preferences")


# Kafka's rule for topic names (at most 249 characters); our longest suffix, "policy-versions", has 15.
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]*")
_MAX_PREFIX = 249 - len("policy-versions")


def dlq(topic: str) -> str:
    return f"{topic}.dlq"


def check_prefix(prefix: str) -> None:
    """InvalidArgument unless `prefix` + every topic name is a legal Kafka topic name."""
    if not _TOPIC_NAME.fullmatch(prefix) or len(prefix) > _MAX_PREFIX:
        raise InvalidArgument(
            f"--prefix: {prefix!r}: use at most {_MAX_PREFIX} of the characters A-Z a-z 0-9 . _ -"
        )


def kafka_failure(bootstrap: str, exc: Exception) -> CAIError:
    """One line for a confluent-kafka error, named by its librdkafka error code."""
    from confluent_kafka import KafkaError, KafkaException

    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    if not isinstance(error, KafkaError):
        return Unavailable(f"--kafka {bootstrap}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return Unavailable(f"--kafka {bootstrap}: {error.name()}: {error.str().splitlines()[0][:200]}")


def cluster_metadata(admin: AdminClient, bootstrap: str, timeout: float = 5.0) -> ClusterMetadata:
    """Brokers and topics of the cluster; the first request of every command, so an unreachable
    --kafka is reported here, in `timeout` seconds."""
    from confluent_kafka import KafkaError, KafkaException

    try:
        return admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        error = exc.args[0]
        # librdkafka says _TRANSPORT whether the port is closed, the host unknown or silent.
        if error.code() in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._RESOLVE):
            raise Unavailable(f"--kafka: no Kafka broker answers at {bootstrap}") from None
        raise kafka_failure(bootstrap, exc) from None


@dataclass(frozen=True)
class TopicSpec:
    partitions: int = 4
    replication: int = 1
    retention_ms: int = 7 * 24 * 3600 * 1000  # a week: long enough to replay a run


def all_topics(prefix: str = "") -> list[str]:
    return [prefix + t for t in TOPICS] + [dlq(prefix + t) for t in INPUT_TOPICS]


def create_topics(bootstrap: str, spec: TopicSpec = TopicSpec(), prefix: str = "") -> dict[str, str]:
    """Create the missing topics; returns {topic: "created" | "exists"}. Existing ones are left as
    they are (partitions can only grow, and only on purpose)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    from cai.kafka import client

    check_prefix(prefix)
    with client.admin(bootstrap, "cai-topics") as admin:
        cluster = cluster_metadata(admin, bootstrap)
        brokers = len(cluster.brokers)
        if spec.replication > brokers:  # the broker's own refusal names neither the flag nor the fix
            raise InvalidArgument(
                f"--replication: {spec.replication} replicas need as many brokers; {bootstrap} has {brokers}"
            )
        result = {}
        missing = []
        for name in all_topics(prefix):
            if name in cluster.topics:
                result[name] = "exists"
                continue
            # Dead letters are kept longer: someone has to look at them.
            retention = spec.retention_ms * (4 if name.endswith(".dlq") else 1)
            partitions = 1 if name.endswith(".dlq") or name.endswith("policy-versions") else spec.partitions
            config = {"retention.ms": str(retention)}
            missing.append(NewTopic(name, partitions, spec.replication, config=config))
        if not missing:
            return result
        try:
            for name, future in admin.create_topics(missing, request_timeout=15).items():
                try:
                    future.result()
                    result[name] = "created"
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
                    result[name] = "exists"  # another process created it meanwhile
            _wait_for_leaders(admin, bootstrap, [topic.topic for topic in missing])
        except KafkaException as exc:
            raise kafka_failure(bootstrap, exc) from None
        return result


def _wait_for_leaders(admin: AdminClient, bootstrap: str, names: list[str], timeout: float = 15.0) -> None:
    """Until every partition of `names` has a leader, so that a producer that starts next finds them."""
    deadline = time.monotonic() + timeout
    while True:
        topics = cluster_metadata(admin, bootstrap).topics
        waiting = [
            name
            for name in names
            if name not in topics
            or not topics[name].partitions
            or any(p.leader < 0 for p in topics[name].partitions.values())
        ]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise Unavailable(f"--kafka {bootstrap}: topic {waiting[0]!r} has no leader after {timeout:.0f}s")
        time.sleep(0.1)
