"""The pipeline's topics and their creation (idempotent)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cai.errors import CAIError, InvalidArgument, Unavailable

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
    """One line for a kafka-python error: their messages can repeat a whole request and response."""
    from kafka.errors import KafkaTimeoutError

    if isinstance(exc, KafkaTimeoutError) and "bootstrap" in str(exc):
        return Unavailable(f"--kafka: no Kafka broker answers at {bootstrap}")
    detail = getattr(exc, "description", None) or str(exc).splitlines()[0][:200]
    return Unavailable(f"--kafka {bootstrap}: {type(exc).__name__}: {detail}")


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
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    check_prefix(prefix)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="cai-topics",
            request_timeout_ms=15000,
            bootstrap_timeout_ms=5000,  # an unreachable --kafka is reported in seconds, not after 30
        )
    except KafkaError as exc:
        raise kafka_failure(bootstrap, exc) from None
    try:
        brokers = len(admin.describe_cluster()["brokers"])
        if spec.replication > brokers:  # the broker's own refusal names neither the flag nor the fix
            raise InvalidArgument(
                f"--replication: {spec.replication} replicas need as many brokers; {bootstrap} has {brokers}"
            )
        existing = set(admin.list_topics())
        result = {}
        missing = []
        for name in all_topics(prefix):
            if name in existing:
                result[name] = "exists"
                continue
            # Dead letters are kept longer: someone has to look at them.
            retention = spec.retention_ms * (4 if name.endswith(".dlq") else 1)
            partitions = 1 if name.endswith(".dlq") or name.endswith("policy-versions") else spec.partitions
            missing.append(
                NewTopic(name, partitions, spec.replication, topic_configs={"retention.ms": str(retention)})
            )
        for topic in missing:
            try:
                # Waiting for the partitions' leaders lets a producer that starts next find them.
                admin.create_topics([topic], wait_for_metadata=True)
                result[topic.name] = "created"
            except TopicAlreadyExistsError:  # another process created it meanwhile
                result[topic.name] = "exists"
        return result
    except KafkaError as exc:
        raise kafka_failure(bootstrap, exc) from None
    finally:
        admin.close()
