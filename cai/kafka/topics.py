"""The pipeline's topics and their creation (idempotent)."""

from __future__ import annotations

from dataclasses import dataclass

from cai.errors import Unavailable

# The input topics of a stage or of the trainer get a dead-letter topic: `<topic>.dlq`.
TOPICS = ("prompts", "rollouts", "revisions", "preferences", "policy-versions")
INPUT_TOPICS = ("prompts", "rollouts", "revisions", "preferences")


def dlq(topic: str) -> str:
    return f"{topic}.dlq"


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

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, client_id="cai-topics", request_timeout_ms=15000
        )
    except KafkaError as exc:
        raise Unavailable(f"--kafka: cannot reach {bootstrap}: {exc}") from None
    try:
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
                admin.create_topics([topic])
                result[topic.name] = "created"
            except TopicAlreadyExistsError:  # another process created it meanwhile
                result[topic.name] = "exists"
        return result
    finally:
        admin.close()
